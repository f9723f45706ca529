//! qcow2 internal snapshots with qemu-img as the peer: our snapshots revert to the right bytes
//! through several levels and deletions, `qemu-img check` stays clean after every step,
//! `qemu-img snapshot -l/-a` agree with ours, and we read, write, revert and delete snapshots
//! that qemu-img made. Damaged snapshot tables are refused with clear errors.
mod common;
use common::*;
use ferro_block::qcow2::Qcow2;
use ferro_block::{Access, CreateOptions, DiskImage, Format, create};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn new_image(s: &TempDir, name: &str, cluster: u64, compat_v2: bool) -> PathBuf {
    let q = s.join(name);
    let mut o = CreateOptions::new(Format::Qcow2, Some(SIZE));
    o.cluster_size = cluster;
    o.compat_v2 = compat_v2;
    create(&q, &o).expect("create");
    q
}

fn rw(q: &Path) -> Qcow2 {
    Qcow2::open(q, Access::Write).expect("open for writing")
}

/// Writes partial, whole and cluster-crossing pieces (and a zeroed and a discarded range),
/// mirrored into `model`.
fn scribble(img: &mut Qcow2, model: &mut [u8], seed: u64) {
    let writes: [(u64, usize); 6] = [
        (seed * 4096 % MIB, 512),
        (65_536 + 17 + seed, 70_000),
        (SIZE / 2 - 1000, 3000),
        (SIZE - 4096, 4096),
        ((seed % 5) * MIB, 65_536),
        (5 * MIB - 10, 200_000),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let d = data(seed * 100 + i as u64, len);
        img.write_at(&d, off).expect("write");
        model[off as usize..off as usize + len].copy_from_slice(&d);
    }
    let z = (6 * MIB + seed * 65_536, 131_072u64);
    img.write_zeroes(z.0, z.1).expect("write zeroes");
    model[z.0 as usize..(z.0 + z.1) as usize].fill(0);
    img.discard(7 * MIB, 65_536).expect("discard");
    model[7 * MIB as usize..(7 * MIB + 65_536) as usize].fill(0);
    img.flush().expect("flush");
}

fn read(img: &mut Qcow2) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).expect("read");
    buf
}

/// qemu-img check clean (no errors, no leaks) and our own check agrees.
fn assert_clean(q: &Path, step: &str) {
    let out = qemu_img(&["check", p(q)]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("No errors were found"), "{step}: qemu-img check: {text}");
    let ours = ferro_block::qcow2::check::check(q, false, Access::Read).expect("our check");
    assert_eq!((ours.corruptions, ours.leaks), (0, 0), "{step}: our check: {:?}", ours.messages);
}

/// Snapshot names as `qemu-img snapshot -l` lists them, with their disk sizes from `qemu-img
/// info --output=json`.
fn qemu_snapshots(q: &Path) -> Vec<(String, u64)> {
    let list = qemu_img_ok(&["snapshot", "-l", p(q)]);
    let info: serde_json::Value = serde_json::from_str(&qemu_img_ok(&["info", "--output=json", p(q)])).expect("info json");
    let snaps = info["snapshots"].as_array().cloned().unwrap_or_default();
    let names: Vec<(String, u64)> = snaps
        .iter()
        .map(|s| (s["name"].as_str().expect("name").to_string(), s["vm-state-size"].as_u64().expect("vm-state-size")))
        .collect();
    for (n, _) in &names {
        assert!(list.contains(n.as_str()), "qemu-img snapshot -l misses {n}: {list}");
    }
    names
}

/// What qemu-img's revert of `name` on a copy of `q` reads (the reference revert).
fn qemu_revert_copy(q: &Path, name: &str, s: &TempDir) -> Vec<u8> {
    let copy = s.join("qemu-revert.qcow2");
    std::fs::copy(q, &copy).expect("copy image");
    qemu_img_ok(&["snapshot", "-a", name, p(&copy)]);
    let bytes = qemu_read_all(&copy, s);
    assert_clean(&copy, "after qemu-img snapshot -a");
    std::fs::remove_file(&copy).expect("remove copy");
    bytes
}

#[test]
fn snapshots_revert_through_levels_and_deletes_with_qemu_agreeing() {
    let s = TempDir::new("snap-levels");
    for (cluster, v2) in [(65_536u64, false), (512, false), (4096, true), (2 * MIB, false)] {
        let case = format!("cluster {cluster} v2 {v2}");
        let q = new_image(&s, "levels.qcow2", cluster, v2);
        let mut model = vec![0u8; SIZE as usize];
        let mut levels = Vec::new();
        let mut img = rw(&q);
        for (level, name) in ["base", "middle", "top"].iter().enumerate() {
            scribble(&mut img, &mut model, level as u64 + 1);
            let info = img.create_snapshot(name).expect("create snapshot");
            assert_eq!((info.name.as_str(), info.id.clone(), info.disk_size), (*name, (level + 1).to_string(), Some(SIZE)));
            levels.push(model.clone());
            drop(img);
            assert_clean(&q, &format!("{case}: after snapshot {name}"));
            img = rw(&q);
        }
        // Writes after the last snapshot copy shared clusters; the snapshots keep theirs.
        scribble(&mut img, &mut model, 9);
        assert_eq!(read(&mut img), model, "{case}: writes over shared clusters");
        let err = img.create_snapshot("middle").expect_err("duplicate name");
        assert!(err.to_string().contains("\"middle\" exists already"), "{case}: {err}");
        drop(img);
        assert_clean(&q, &format!("{case}: after writes over snapshots"));
        let listed = qemu_snapshots(&q);
        assert_eq!(listed, vec![("base".into(), 0), ("middle".into(), 0), ("top".into(), 0)], "{case}");

        for (i, name) in [(1usize, "middle"), (0, "base"), (2, "top")] {
            let reference = qemu_revert_copy(&q, name, &s);
            let mut img = rw(&q);
            img.apply_snapshot(name).expect("apply");
            let ours = read(&mut img);
            assert!(ours == levels[i], "{case}: revert to {name} reads other bytes");
            assert!(ours == reference, "{case}: qemu-img snapshot -a {name} reads other bytes than ours");
            // Writing after a revert must not touch the snapshot.
            scribble(&mut img, &mut model, 20 + i as u64);
            drop(img);
            assert_clean(&q, &format!("{case}: after revert to {name} and writes"));
        }

        let mut img = rw(&q);
        img.delete_snapshot("middle").expect("delete middle");
        let names: Vec<String> = img.snapshots().expect("list").into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["base", "top"], "{case}");
        drop(img);
        assert_clean(&q, &format!("{case}: after deleting the middle snapshot"));
        for (i, name) in [(0usize, "base"), (2, "top")] {
            let mut img = rw(&q);
            img.apply_snapshot(name).expect("apply after delete");
            assert!(read(&mut img) == levels[i], "{case}: {name} after deleting middle");
        }
        // Deleting everything frees every cluster only the snapshots held.
        let mut img = rw(&q);
        img.delete_snapshot("1").expect("delete base by id");
        img.delete_snapshot("top").expect("delete top");
        assert!(img.snapshots().expect("list").is_empty());
        drop(img);
        assert_clean(&q, &format!("{case}: after deleting all snapshots"));
        assert_eq!(qemu_read_all(&q, &s), levels[2], "{case}: qemu reads the last revert");
        std::fs::remove_file(&q).expect("remove");
    }
}

#[test]
fn qemu_made_snapshots_are_read_written_reverted_and_deleted() {
    let s = TempDir::new("snap-theirs");
    let q = s.join("theirs.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", p(&q), "8M"]);
    qemu_io("qcow2", &q, &["write -P 0x11 0 1M", "write -P 0x12 3M 64k"]);
    qemu_img_ok(&["snapshot", "-c", "q1", p(&q)]);
    let at_q1 = qemu_read_all(&q, &s);
    qemu_io("qcow2", &q, &["write -P 0x21 512k 1M", "write -z 3M 64k"]);
    qemu_img_ok(&["snapshot", "-c", "q2", p(&q)]);
    let at_q2 = qemu_read_all(&q, &s);
    qemu_io("qcow2", &q, &["write -P 0x31 0 100k", "discard 1M 512k"]);
    let mut model = qemu_read_all(&q, &s);

    let mut img = rw(&q);
    let names: Vec<(String, String)> = img.snapshots().expect("list").into_iter().map(|i| (i.id, i.name)).collect();
    assert_eq!(names, [("1".to_string(), "q1".to_string()), ("2".into(), "q2".into())]);
    assert_eq!(read(&mut img), model, "active layer of qemu's image");
    scribble(&mut img, &mut model, 3);
    assert_eq!(read(&mut img), model);
    img.create_snapshot("ours").expect("our snapshot beside qemu's");
    drop(img);
    assert_clean(&q, "after writing to qemu's image with snapshots");
    assert_eq!(qemu_snapshots(&q).iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["q1", "q2", "ours"]);
    assert_eq!(qemu_revert_copy(&q, "ours", &s), model, "qemu reverts to our snapshot");

    let mut img = rw(&q);
    img.apply_snapshot("q2").expect("apply q2");
    assert!(read(&mut img) == at_q2, "revert to qemu's q2");
    img.apply_snapshot("q1").expect("apply q1");
    assert!(read(&mut img) == at_q1, "revert to qemu's q1");
    img.delete_snapshot("q2").expect("delete q2");
    drop(img);
    assert_clean(&q, "after reverting and deleting qemu's snapshots");
    // qemu-img takes over again: it reverts to ours and deletes the rest.
    qemu_img_ok(&["snapshot", "-a", "ours", p(&q)]);
    qemu_img_ok(&["snapshot", "-d", "q1", p(&q)]);
    assert_clean(&q, "after qemu-img revert and delete");
    let mut img = rw(&q);
    assert!(read(&mut img) == model, "our read after qemu's revert to our snapshot");
}

/// A snapshot taken at another virtual size brings its size back on revert, both ways, as
/// qemu-img's revert does: the bytes match qemu-img's revert of the same image.
#[test]
fn a_revert_brings_back_the_snapshots_virtual_size_as_qemu_does() {
    let s = TempDir::new("snap-resize");
    let q = new_image(&s, "resized.qcow2", 65_536, false);
    let mut img = rw(&q);
    img.write_at(&data(1, 4096), SIZE - 4096).expect("write the last page");
    img.create_snapshot("small").expect("snapshot at 8 MiB");
    img.resize(2 * SIZE).expect("grow to 16 MiB");
    img.write_at(&data(2, 65_536), 2 * SIZE - MIB).expect("write beyond the old size");
    img.create_snapshot("big").expect("snapshot at 16 MiB");
    img.write_at(&data(3, 65_536), 2 * SIZE - MIB).expect("write after the snapshot");
    drop(img);
    let qemu_small = qemu_revert_copy(&q, "small", &s);
    let qemu_big = qemu_revert_copy(&q, "big", &s);
    assert_eq!((qemu_small.len() as u64, qemu_big.len() as u64), (SIZE, 2 * SIZE), "qemu-img's reverts resize");

    let mut img = rw(&q);
    img.apply_snapshot("small").expect("revert to the smaller snapshot");
    assert_eq!(img.size(), SIZE);
    assert!(read(&mut img) == qemu_small, "our revert to the 8 MiB snapshot reads as qemu-img's");
    drop(img);
    assert_clean(&q, "after shrinking by a revert");
    let info: serde_json::Value = serde_json::from_str(&qemu_img_ok(&["info", "--output=json", p(&q)])).expect("info json");
    assert_eq!(info["virtual-size"].as_u64(), Some(SIZE), "{info}");

    let mut img = rw(&q);
    img.apply_snapshot("big").expect("revert to the larger snapshot");
    assert_eq!(img.size(), 2 * SIZE);
    let bytes = read(&mut img);
    assert!(bytes[(2 * SIZE - MIB) as usize..][..65_536] == data(2, 65_536)[..], "the data beyond the old size comes back");
    assert!(bytes == qemu_big, "our revert to the 16 MiB snapshot reads as qemu-img's");
    drop(img);
    assert_clean(&q, "after growing by a revert");
}

#[test]
fn dirty_bitmaps_survive_snapshots_and_mark_reverted_ranges() {
    let s = TempDir::new("snap-bitmaps");
    let q = new_image(&s, "bitmap.qcow2", 65_536, false);
    let mut model = vec![0u8; SIZE as usize];
    let mut img = rw(&q);
    scribble(&mut img, &mut model, 1);
    img.create_snapshot("before").expect("snapshot");
    img.add_bitmap("backup", None, true).expect("add bitmap");
    img.write_at(&data(7, 4096), 0).expect("write");
    img.apply_snapshot("before").expect("apply");
    let map = img.dirty_bitmap("backup").expect("bitmap");
    // The revert changed the data of the first L2 table's range; the bitmap must cover the
    // write and everything the revert may have changed there.
    assert!(map.ranges().iter().any(|&(off, len)| off == 0 && len >= 65_536), "ranges {:?}", map.ranges());
    img.close().expect("close");
    assert_clean(&q, "bitmap and snapshot together");
    let info = qemu_img_ok(&["info", p(&q)]);
    assert!(info.contains("backup") && info.contains("before"), "qemu-img info: {info}");
}

/// Byte offset of snapshot table entry 0 (read from the header).
fn table_offset(q: &Path) -> usize {
    let b = std::fs::read(q).expect("read");
    u64::from_be_bytes(b[64..72].try_into().expect("8 bytes")) as usize
}

fn patch(q: &Path, off: usize, bytes: &[u8]) {
    let mut b = std::fs::read(q).expect("read");
    b[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(q, b).expect("write");
}

#[test]
fn hostile_snapshot_tables_are_refused_clearly() {
    let s = TempDir::new("snap-hostile");
    let fresh = |name: &str| {
        let q = new_image(&s, name, 65_536, false);
        let mut img = rw(&q);
        img.write_at(&data(1, 100_000), 0).expect("write");
        img.create_snapshot("one").expect("snapshot");
        img.create_snapshot("two").expect("snapshot");
        drop(img);
        q
    };
    let open_err = |q: &Path| match Qcow2::open(q, Access::Read) {
        Ok(_) => panic!("{} opened", q.display()),
        Err(e) => e.to_string(),
    };

    let q = fresh("table-past-end.qcow2");
    let len = std::fs::metadata(&q).expect("stat").len();
    patch(&q, 64, &(len + 65_536).to_be_bytes());
    let e = open_err(&q);
    assert!(e.contains("snapshot table") && e.contains("past the end of the file"), "{e}");

    let q = fresh("l1-absurd.qcow2");
    patch(&q, table_offset(&q) + 8, &u32::MAX.to_be_bytes());
    let e = open_err(&q);
    assert!(e.contains("snapshot 0: L1 table") && e.contains("invalid"), "{e}");

    let q = fresh("l1-past-end.qcow2");
    patch(&q, table_offset(&q), &(1u64 << 40).to_be_bytes());
    let e = open_err(&q);
    assert!(e.contains("snapshot L1 table") && e.contains("past the end"), "{e}");

    let q = fresh("many.qcow2");
    patch(&q, 60, &u32::MAX.to_be_bytes());
    let e = open_err(&q);
    assert!(e.contains("snapshots (limit 65536)"), "{e}");

    // Two snapshots named alike: a revert or delete by that name would have to guess.
    let q = fresh("dup.qcow2");
    let second = table_offset(&q) + (40 + 24 + 1 + 3usize).next_multiple_of(8);
    let b = std::fs::read(&q).expect("read");
    assert_eq!(&b[second + 40 + 24 + 1..second + 40 + 24 + 4], b"two", "second entry layout");
    patch(&q, second + 40 + 24 + 1, b"one");
    let mut img = rw(&q);
    for e in [img.apply_snapshot("one").expect_err("ambiguous"), img.delete_snapshot("one").expect_err("ambiguous")] {
        assert!(e.to_string().contains("\"one\" is ambiguous: snapshots with ids 1, 2"), "{e}");
    }
    img.delete_snapshot("2").expect("delete by id still works");
    drop(img);
    assert_clean(&q, "after resolving the duplicate by id");

    let mut o = CreateOptions::new(Format::Qcow2, Some(SIZE));
    o.refcount_bits = 1;
    let q = s.join("rb1.qcow2");
    create(&q, &o).expect("create");
    let e = rw(&q).create_snapshot("x").expect_err("1-bit refcounts");
    assert!(e.to_string().contains("refcount_bits of at least 2"), "{e}");
}

#[test]
fn raw_images_are_refused_naming_the_file() {
    let s = TempDir::new("snap-raw");
    let r = s.join("disk.raw");
    create(&r, &CreateOptions::new(Format::Raw, Some(MIB))).expect("create raw");
    let mut img = ferro_block::open(&r, None, false).expect("open raw");
    let e = ferro_block::snapshot_capable(img.as_mut()).err().expect("raw refused").to_string();
    assert!(e.contains("disk.raw") && e.contains("raw image cannot hold internal snapshots") && e.contains("qcow2"), "{e}");
}

/// The disk at one moment of the power-loss workload: the active contents and each snapshot's.
#[derive(Clone)]
struct Moment {
    active: Vec<u8>,
    snapshots: Vec<String>,
}

/// What a snapshot named `name` reads in the image at `path`: reverted on a copy.
fn snapshot_contents(path: &Path, name: &str) -> Result<Vec<u8>, String> {
    let copy = path.with_extension("revert");
    std::fs::copy(path, &copy).map_err(|e| format!("copy: {e}"))?;
    let mut img = Qcow2::open(&copy, Access::Write).map_err(|e| format!("open the copy: {e}"))?;
    img.apply_snapshot(name).map_err(|e| format!("revert to {name}: {e}"))?;
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).map_err(|e| format!("read {name}: {e}"))?;
    Ok(buf)
}

/// Our check may find leaks and COPIED flags that disagree with a refcount (QEMU's snapshot
/// code leaves the same after a crash; both are harmless to data), never a refcount too low.
fn only_leaks_and_flags(path: &Path) -> Result<(), String> {
    let report = ferro_block::qcow2::check::check(path, false, Access::Read).map_err(|e| format!("check: {e}"))?;
    let bad: Vec<&String> =
        report.messages.iter().filter(|m| !m.starts_with("Leaked cluster") && !m.contains("OFLAG_COPIED")).collect();
    if bad.is_empty() { Ok(()) } else { Err(format!("check: {bad:?}")) }
}

/// One crash image: the active disk reads, byte by byte, what one of the `allowed` moments had;
/// the snapshot list is one of theirs and every snapshot reads what it was taken with; the image
/// takes more writes and its snapshots still read the same afterwards.
fn check_snapshot_crash(path: &Path, allowed: &[&Moment], taken: &[(String, Vec<u8>)], seed: u64) -> Result<(), String> {
    only_leaks_and_flags(path)?;
    let mut img = Qcow2::open(path, Access::Read).map_err(|e| format!("open: {e}"))?;
    let names: Vec<String> = img.snapshots().map_err(|e| format!("list: {e}"))?.into_iter().map(|s| s.name).collect();
    if !allowed.iter().any(|m| m.snapshots == names) {
        return Err(format!("snapshot list {names:?}"));
    }
    let view = read(&mut img);
    drop(img);
    if let Some(i) = (0..view.len()).find(|&i| !allowed.iter().any(|m| m.active[i] == view[i])) {
        return Err(format!("active byte {i:#x} is {:#x}, from no moment of the operation", view[i]));
    }
    let verify_snapshots = |when: &str| -> Result<(), String> {
        for name in &names {
            let want = &taken.iter().find(|(n, _)| n == name).ok_or("unknown snapshot")?.1;
            if snapshot_contents(path, name)? != *want {
                return Err(format!("{when}: snapshot {name} reads other bytes"));
            }
        }
        Ok(())
    };
    verify_snapshots("after the crash")?;
    let mut img = Qcow2::open(path, Access::Write).map_err(|e| format!("open for writing: {e}"))?;
    let more = data(seed, 300_000);
    img.write_at(&more, seed % 500_000).map_err(|e| format!("write on: {e}"))?;
    img.flush().map_err(|e| format!("flush: {e}"))?;
    drop(img);
    only_leaks_and_flags(path)?;
    verify_snapshots("after writing on")
}

#[test]
fn snapshot_operations_survive_power_loss_anywhere() {
    use common::powerloss::{Mark, Recorder, for_each_interval, subsets};
    let s = TempDir::new("snap-powerloss");
    let path = s.join("crash-image");
    let mut o = CreateOptions::new(Format::Qcow2, Some(MIB));
    o.cluster_size = 4096;
    create(&path, &o).expect("create");
    let rec = Recorder::new(std::fs::read(&path).expect("read"));
    let mut img = Qcow2::open_on(Box::new(rec.clone()), &path, false).expect("open on the recorder");
    let mut moments = vec![Moment { active: vec![0; MIB as usize], snapshots: Vec::new() }];
    let mut taken: Vec<(String, Vec<u8>)> = Vec::new();
    rec.mark(Mark::FlushDone(0));
    let mut m = moments[0].clone();
    let mut done = |img: &mut Qcow2, m: Moment| {
        assert!(read(img) == m.active, "the workload itself read other bytes");
        moments.push(m);
        rec.mark(Mark::FlushDone(moments.len() - 1));
    };
    let write = |img: &mut Qcow2, m: &mut Moment, seed: u64, off: u64, len: usize| {
        let d = data(seed, len);
        img.write_at(&d, off).expect("write");
        img.flush().expect("flush");
        m.active[off as usize..off as usize + len].copy_from_slice(&d);
    };
    write(&mut img, &mut m, 1, 0, 200_000);
    done(&mut img, m.clone());
    for (name, seed, off) in [("s1", 2u64, 100_000u64), ("s2", 3, 600_000)] {
        img.create_snapshot(name).expect("create");
        m.snapshots.push(name.into());
        taken.push((name.into(), m.active.clone()));
        done(&mut img, m.clone());
        write(&mut img, &mut m, seed, off, 150_000);
        done(&mut img, m.clone());
    }
    img.apply_snapshot("s1").expect("apply");
    m.active = taken[0].1.clone();
    done(&mut img, m.clone());
    write(&mut img, &mut m, 4, 50_000, 100_000);
    done(&mut img, m.clone());
    img.delete_snapshot("s1").expect("delete");
    m.snapshots.retain(|n| n != "s1");
    done(&mut img, m.clone());
    img.apply_snapshot("s2").expect("apply");
    m.active = taken[1].1.clone();
    done(&mut img, m.clone());
    drop(img);

    let crash = s.join("crash.qcow2");
    let mut r = {
        let mut x = 0x5eed_u64;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    };
    let (mut states, mut failures) = (0, Vec::new());
    let mut first = 0;
    let log = rec.log();
    for_each_interval(&log, |iv| {
        let last = iv.marks.iter().filter_map(|m| if let Mark::FlushDone(n) = m { Some(*n) } else { None }).max().unwrap_or(0);
        let allowed: Vec<&Moment> = moments[first..=(last + 1).min(moments.len() - 1)].iter().collect();
        for keep in subsets(iv.pending.len(), 8, &mut r) {
            states += 1;
            std::fs::write(&crash, iv.crash(&keep)).expect("write the crash image");
            if let Err(e) = check_snapshot_crash(&crash, &allowed, &taken, r()) {
                failures.push(format!("interval {} ({} of {} writes kept): {e}", iv.index, keep.iter().filter(|&&k| k).count(), keep.len()));
            }
        }
        first = last;
    });
    assert!(failures.is_empty(), "{} of {states} crash states broke a promise:\n{}", failures.len(), failures[..failures.len().min(10)].join("\n"));
    eprintln!("snapshot create/apply/delete: {states} crash states checked");
}
