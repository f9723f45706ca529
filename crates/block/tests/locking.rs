//! Image locks against QEMU's own: qemu-io (a real QEMU block layer holding an image while it
//! waits for commands) and qemu-img refuse images we hold, we refuse images they hold, in the
//! same combinations QEMU refuses among its own processes; `-U` reads anyway; the chain usage
//! API sees who uses which file.
mod common;
use common::*;
use ferro_block::lock::{Use, chain_usage, file_use};
use ferro_block::ops::{self, CompareOptions, ConvertOptions};
use ferro_block::{Access, CreateOptions, Error, Format, OpenOptions, create, open, open_with};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use ferro_test_support::wait_for;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A qemu-io process holding an image open until dropped.
struct QemuHolder {
    child: Child,
}

impl QemuHolder {
    /// Starts qemu-io on `img` (read-only with `readonly`) and waits until its locks are on
    /// the file.
    fn start(img: &Path, readonly: bool) -> QemuHolder {
        let mut args = vec!["-f", "qcow2"];
        if readonly {
            args.push("-r");
        }
        args.push(p(img));
        let child = Command::new("qemu-io")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run qemu-io (is qemu-utils installed?)");
        let holder = QemuHolder { child };
        wait_for("qemu-io to lock the image", Duration::from_secs(20), || file_use(img).expect("probe locks") != Use::Unused);
        holder
    }
}

impl Drop for QemuHolder {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.child.wait();
    }
}

/// A base and an overlay on it, both qcow2.
fn chain(s: &TempDir) -> (PathBuf, PathBuf) {
    let base = s.join("base.qcow2");
    create(&base, &CreateOptions::new(Format::Qcow2, Some(4 * MIB))).expect("base");
    let top = s.join("top.qcow2");
    let mut o = CreateOptions::new(Format::Qcow2, None);
    o.backing_file = Some("base.qcow2".into());
    o.backing_format = Some(Format::Qcow2);
    create(&top, &o).expect("top");
    (base, top)
}

fn in_use(r: ferro_block::Result<Box<dyn ferro_block::DiskImage>>, want: &str) {
    match r {
        Err(Error::InUse { reason, .. }) => assert!(reason.contains(want), "reason {reason:?} should mention {want:?}"),
        Err(e) => panic!("expected an in-use refusal, got {e}"),
        Ok(_) => panic!("expected an in-use refusal, the open succeeded"),
    }
}

fn shared() -> OpenOptions {
    OpenOptions { format: None, access: Access::ReadShared, open_backing: true }
}

/// qemu refuses what it would refuse among its own processes; the message is qemu's.
fn qemu_refuses(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run qemu tool");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lock"), "{args:?} should be refused for a lock: {err}");
}

fn qemu_accepts(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run qemu tool");
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn qemu_refuses_images_we_hold() {
    let s = TempDir::new("block-lock-ours");
    let (base, top) = chain(&s);
    {
        // We write the overlay: qemu may neither open it nor write its backing file, but may
        // read the backing file (shared readers) and read anything with -U.
        let mut img = open(&top, None, false).expect("open rw");
        img.write_at(&[1; 512], 0).expect("write");
        qemu_refuses(&["qemu-img", "info", p(&top)]);
        qemu_refuses(&["qemu-img", "check", p(&top)]);
        qemu_refuses(&["qemu-io", "-r", "-c", "read 0 512", p(&top)]);
        qemu_refuses(&["qemu-io", "-c", "write 0 512", p(&base)]);
        qemu_accepts(&["qemu-io", "-r", "-c", "read 0 512", p(&base)]);
        qemu_accepts(&["qemu-img", "info", "-U", p(&top)]);
        assert_eq!(file_use(&top).expect("probe"), Use::Write);
        assert_eq!(file_use(&base).expect("probe"), Use::Read);
    }
    {
        // We only read: other readers are welcome, writers are not.
        let _img = open(&top, None, true).expect("open ro");
        qemu_accepts(&["qemu-io", "-r", "-c", "read 0 512", p(&top)]);
        qemu_refuses(&["qemu-io", "-c", "write 0 512", p(&top)]);
    }
    {
        // A -U reader blocks nobody.
        let _img = open_with(&top, &shared()).expect("open shared");
        qemu_accepts(&["qemu-io", "-c", "write 0 512", p(&top)]);
    }
    // Everything released: qemu writes again.
    qemu_accepts(&["qemu-io", "-c", "write 0 512", p(&top)]);
    assert_qemu_check_clean(&top);
}

#[test]
fn we_refuse_images_qemu_holds() {
    let s = TempDir::new("block-lock-theirs");
    let (base, top) = chain(&s);
    {
        let _q = QemuHolder::start(&top, false);
        in_use(open(&top, None, false), "\"write\" permission");
        in_use(open(&top, None, true), "\"write\" permission");
        in_use(open(&base, None, false), "does not share the \"write\" permission");
        let mut reader = open(&base, None, true).expect("a second reader of the backing file");
        reader.read_at(&mut [0; 512], 0).expect("read");
        drop(reader);
        // -U reads anyway, through every operation that reads.
        let mut img = open_with(&top, &shared()).expect("-U open");
        img.read_at(&mut [0; 512], 0).expect("-U read");
        drop(img);
        assert!(matches!(ops::info(&top, None, true, false), Err(Error::InUse { .. })));
        assert_eq!(ops::info(&top, None, true, true).expect("info -U").len(), 2);
        assert!(matches!(ops::map(&top, None, false), Err(Error::InUse { .. })));
        ops::map(&top, None, true).expect("map -U");
        assert!(matches!(ops::check(&top, None, false, false), Err(Error::InUse { .. })));
        ops::check(&top, None, false, true).expect("check -U");
        assert!(ops::check(&top, None, true, true).is_err(), "repair cannot be forced shared");
        let out = s.join("copy.raw");
        let mut opts = ConvertOptions { src_format: None, force_share: false, dst: CreateOptions::new(Format::Raw, None) };
        assert!(matches!(ops::convert(&top, &out, &opts, &mut |_, _| {}), Err(Error::InUse { .. })));
        opts.force_share = true;
        ops::convert(&top, &out, &opts, &mut |_, _| {}).expect("convert -U");
        let cmp = |force_share| CompareOptions { format_a: None, format_b: None, strict: false, force_share };
        assert!(matches!(ops::compare(&top, &out, &cmp(false), &mut |_, _| {}), Err(Error::InUse { .. })));
        ops::compare(&top, &out, &cmp(true), &mut |_, _| {}).expect("compare -U");
        assert!(matches!(ops::resize(&top, None, ops::SizeChange::Grow(MIB), false), Err(Error::InUse { .. })));
        assert!(matches!(ops::commit(&top, None, false, &mut |_, _| {}), Err(Error::InUse { .. })));
        // Creating over an image in use is refused before anything is truncated.
        let before = std::fs::read(&top).expect("read");
        let e = create(&top, &CreateOptions::new(Format::Qcow2, Some(MIB))).expect_err("create over an image in use");
        assert!(matches!(e, Error::InUse { .. }), "{e}");
        assert!(std::fs::read(&top).expect("read") == before, "create touched an image in use");
    }
    {
        // qemu only reads: we may read too, not write.
        let _q = QemuHolder::start(&top, true);
        open(&top, None, true).expect("two readers");
        in_use(open(&top, None, false), "does not share the \"write\" permission");
    }
    open(&top, None, false).expect("free again");
}

#[test]
fn two_opens_in_one_process_exclude_each_other_like_two_processes() {
    let s = TempDir::new("block-lock-self");
    let (base, top) = chain(&s);
    let w = open(&top, None, false).expect("writer");
    in_use(open(&top, None, false), "\"write\" permission");
    in_use(open(&base, None, false), "\"write\" permission");
    drop(w);
    let r1 = open(&top, None, true).expect("reader 1");
    let r2 = open(&top, None, true).expect("reader 2");
    in_use(open(&top, None, false), "\"write\" permission");
    drop((r1, r2));
    open(&top, None, false).expect("free again");
}

#[test]
fn chain_usage_reports_every_resolved_file() {
    let s = TempDir::new("block-lock-usage");
    let (base, top) = chain(&s);
    // A symbolic link to the overlay resolves to the same file.
    let link = s.join("link.qcow2");
    std::os::unix::fs::symlink(&top, &link).expect("symlink");
    let free = chain_usage(&link, None).expect("usage");
    let canonical = |p: &Path| p.canonicalize().expect("canonical");
    assert_eq!(free.iter().map(|f| f.path.clone()).collect::<Vec<_>>(), [canonical(&top), canonical(&base)]);
    assert!(free.iter().all(|f| f.used == Use::Unused), "{free:?}");
    assert!(free.iter().all(|f| f.format == Format::Qcow2));
    let top_meta = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&top).expect("stat"));
    assert_eq!(free[0].ino, top_meta);
    {
        let _q = QemuHolder::start(&top, false);
        let used = chain_usage(&link, None).expect("usage while qemu writes");
        assert_eq!(used.iter().map(|f| f.used).collect::<Vec<_>>(), [Use::Write, Use::Read]);
    }
    {
        let _ours = open(&base, None, false).expect("write the base");
        let used = chain_usage(&top, None).expect("usage while we write the base");
        assert_eq!(used.iter().map(|f| f.used).collect::<Vec<_>>(), [Use::Unused, Use::Write]);
    }
}
