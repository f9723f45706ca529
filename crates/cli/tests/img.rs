//! `ferro img` as a user runs it: the binary, its exit statuses and messages.
use ferro_test_support::TempDir;
use ferro_test_support::vm::{ferro, stderr, stdout};
use std::path::Path;
use std::process::Output;

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
