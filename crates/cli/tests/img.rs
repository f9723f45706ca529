//! `ferro img` as a user runs it: the binary, its exit statuses and messages.
use ferro_test_support::TempDir;
use ferro_test_support::vm::{ferro, stderr, stdout};
use std::path::Path;
use std::process::{Command, Output};

fn ferro_img(args: &[&str]) -> Output {
    let mut all = vec!["img"];
    all.extend_from_slice(args);
    ferro(&all)
}

fn text(o: &Output) -> String {
    stdout(o) + &stderr(o)
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// An image another process writes is refused by the reading verbs unless `-U`, and by the
/// writing verbs always; `-U` with a repair is refused.
#[test]
fn img_verbs_refuse_an_image_in_use_unless_force_share() {
    let s = TempDir::new("img-inuse");
    let img = s.join("disk.qcow2");
    let out = ferro_img(&["create", "-q", "-f", "qcow2", p(&img), "4M"]);
    assert!(out.status.success(), "{}", text(&out));
    let held = ferro_block::open(&img, None, false).expect("hold the image for writing");
    for verb in [&["info"][..], &["check"], &["map"]] {
        let mut args = verb.to_vec();
        args.push(p(&img));
        let out = ferro_img(&args);
        assert_eq!(out.status.code(), Some(1), "{verb:?}: {}", text(&out));
        assert!(text(&out).contains("image is in use"), "{verb:?}: {}", text(&out));
        args.insert(1, "-U");
        let out = ferro_img(&args);
        assert!(out.status.success(), "{verb:?} -U: {}", text(&out));
    }
    let out = ferro_img(&["resize", p(&img), "+1M"]);
    assert!(!out.status.success() && text(&out).contains("image is in use"), "{}", text(&out));
    let out = ferro_img(&["check", "-U", "-r", "leaks", p(&img)]);
    assert!(!out.status.success() && text(&out).contains("cannot be forced shared"), "{}", text(&out));
    drop(held);
    let out = ferro_img(&["resize", p(&img), "+1M"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// `ferro img bitmap` takes qemu-img's options, and `qemu-img info` and `ferro img info` agree
/// on the result; bad requests get one line naming what was wrong.
#[test]
fn img_bitmap_like_qemu_img_bitmap() {
    let s = TempDir::new("img-bitmap");
    let img = s.join("disk.qcow2");
    let other = s.join("other.qcow2");
    for f in [&img, &other] {
        let out = ferro_img(&["create", "-q", "-f", "qcow2", p(f), "4M"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let ok = |args: &[&str]| {
        let out = ferro_img(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    };
    ok(&["bitmap", "--add", "-g", "4k", p(&img), "daily"]);
    ok(&["bitmap", "--add", "--disable", p(&img), "weekly"]);
    ok(&["bitmap", "--add", p(&other), "src"]);
    ok(&["bitmap", "--merge", "src", "-b", p(&other), "-F", "qcow2", "--enable", p(&img), "weekly"]);
    let qemu = std::process::Command::new("qemu-img").args(["info", "--output=json", p(&img)]).output().expect("qemu-img");
    let theirs: serde_json::Value = serde_json::from_slice(&qemu.stdout).expect("qemu-img json");
    let ours: serde_json::Value = serde_json::from_str(&stdout(&ferro_img(&["info", "--output", "json", p(&img)]))).expect("our json");
    let expect = serde_json::json!([
        {"flags": ["auto"], "name": "daily", "granularity": 4096},
        {"flags": ["auto"], "name": "weekly", "granularity": 65536},
    ]);
    assert_eq!(theirs["format-specific"]["data"]["bitmaps"], expect, "qemu-img info");
    assert_eq!(ours["format-specific"]["data"]["bitmaps"], expect, "ferro img info");
    let human = stdout(&ferro_img(&["info", p(&img)]));
    assert!(human.contains("    bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n            name: daily\n"), "{human}");
    for (args, msg) in [
        (&["bitmap", p(&img), "daily"][..], "at least one of"),
        (&["bitmap", "--add", p(&img), "daily"], "exists already"),
        (&["bitmap", "--remove", p(&img), "nosuch"], "no bitmap named \"nosuch\""),
        (&["bitmap", "--add", "-g", "1000", p(&img), "odd"], "power of two"),
        (&["bitmap", "--clear", "-g", "4k", p(&img), "daily"], "-g only applies with --add"),
    ] {
        let out = ferro_img(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(msg) && text(&out).lines().count() == 1, "{args:?}: {}", text(&out));
    }
    ok(&["bitmap", "--remove", p(&img), "daily"]);
    ok(&["bitmap", "--remove", p(&img), "weekly"]);
    let ours: serde_json::Value = serde_json::from_str(&stdout(&ferro_img(&["info", "--output", "json", p(&img)]))).expect("our json");
    assert!(ours["format-specific"]["data"].get("bitmaps").is_none(), "{ours}");
}

/// `ferro img snapshot -c/-l/-a/-d` like qemu-img's: qemu-img lists what we create, a revert
/// brings the old bytes back, and raw images and bad requests get one line naming the problem.
#[test]
fn img_snapshot_like_qemu_img_snapshot() {
    let s = TempDir::new("img-snapshot");
    let img = s.join("disk.qcow2");
    let out = ferro_img(&["create", "-q", "-f", "qcow2", p(&img), "4M"]);
    assert!(out.status.success(), "{}", text(&out));
    let fill = |byte: u8| {
        let mut d = ferro_block::open(&img, None, false).expect("open");
        d.write_at(&vec![byte; 100_000], 12_345).expect("write");
        d.flush().expect("flush");
    };
    let read = || {
        let mut d = ferro_block::open(&img, None, true).expect("open");
        let mut b = vec![0u8; 100_000];
        d.read_at(&mut b, 12_345).expect("read");
        b
    };
    let ok = |args: &[&str]| {
        let out = ferro_img(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        stdout(&out)
    };
    fill(0xaa);
    ok(&["snapshot", "-c", "before-upgrade", p(&img)]);
    fill(0xbb);
    ok(&["snapshot", "-c", "after", p(&img)]);
    fill(0xcc);

    let list = ok(&["snapshot", "-l", p(&img)]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines[0], "Snapshot list:", "{list}");
    assert!(lines[1].starts_with("ID      TAG") && lines[1].contains("VM_SIZE") && lines[1].contains("VM_CLOCK"), "{list}");
    assert!(lines[2].starts_with("1       before-upgrade") && lines[2].contains(" 0 B ") && lines[2].ends_with(" --"), "{list}");
    assert!(lines[3].starts_with("2       after"), "{list}");
    let json: serde_json::Value = serde_json::from_str(&ok(&["snapshot", "-l", "--json", p(&img)])).expect("json");
    assert_eq!(json[1]["name"], "after");
    assert_eq!(json[1]["id"], "2");
    assert_eq!(json[1]["disk-size"], 4 << 20);
    let qemu = Command::new("qemu-img").args(["snapshot", "-l", p(&img)]).output().expect("qemu-img (qemu-utils)");
    let qemu_list = String::from_utf8_lossy(&qemu.stdout);
    assert!(qemu_list.contains("before-upgrade") && qemu_list.contains("after"), "qemu-img snapshot -l: {qemu_list}");

    // info lists them as qemu-img info does, in text and JSON.
    let info = ok(&["info", p(&img)]);
    let at = info.find("Snapshot list:").unwrap_or_else(|| panic!("no snapshot list in info: {info}"));
    assert!(info[at..].contains("before-upgrade") && at < info.find("Format specific information:").unwrap_or(0), "{info}");
    let ours: serde_json::Value = serde_json::from_str(&ok(&["info", "--output", "json", p(&img)])).expect("info json");
    let qemu = Command::new("qemu-img").args(["info", "--output=json", p(&img)]).output().expect("qemu-img info");
    let theirs: serde_json::Value = serde_json::from_slice(&qemu.stdout).expect("qemu-img info json");
    for key in ["id", "name", "date-sec", "date-nsec", "vm-state-size", "vm-clock-sec", "vm-clock-nsec"] {
        let pick = |v: &serde_json::Value| v["snapshots"].as_array().map(|a| a.iter().map(|s| s[key].clone()).collect::<Vec<_>>());
        assert_eq!(pick(&ours), pick(&theirs), "info's snapshots, field {key}");
    }

    ok(&["snapshot", "-a", "before-upgrade", p(&img)]);
    assert!(read().iter().all(|&b| b == 0xaa), "revert to before-upgrade");
    ok(&["snapshot", "-a", "2", p(&img)]);
    assert!(read().iter().all(|&b| b == 0xbb), "revert to id 2");
    ok(&["snapshot", "-d", "before-upgrade", p(&img)]);
    let list = ok(&["snapshot", "-l", p(&img)]);
    assert!(!list.contains("before-upgrade") && list.contains("after"), "{list}");
    let check = ok(&["check", p(&img)]);
    assert!(check.contains("No errors were found"), "{check}");

    let fails = |args: &[&str], want: &str| {
        let out = ferro_img(args);
        assert!(!out.status.success() && text(&out).contains(want), "{args:?}: {}", text(&out));
    };
    fails(&["snapshot", "-c", "after", p(&img)], "a snapshot named \"after\" exists already");
    fails(&["snapshot", "-a", "nope", p(&img)], "no snapshot named \"nope\"");
    fails(&["snapshot", p(&img)], "required");
    fails(&["snapshot", "-l", "-c", "x", p(&img)], "cannot be used with");
    let raw = s.join("disk.raw");
    ok(&["create", "-q", "-f", "raw", p(&raw), "1M"]);
    fails(&["snapshot", "-c", "x", p(&raw)], "disk.raw: unsupported: a raw image cannot hold internal snapshots; convert it to qcow2");
}
