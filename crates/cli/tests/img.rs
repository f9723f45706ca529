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
