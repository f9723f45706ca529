//! `ferro img` takes sizes in the one grammar (ferro-vmm-api) that qemu-img users type: every
//! size of the shared table makes an image of exactly that many bytes, every refused one is
//! refused with a one-line error naming it, and resize takes SIZE, +DELTA and -DELTA.

use ferro_test_support::grammar::{NOT_SIZES, SIZES};
use ferro_test_support::vm::{ferro, stderr};
use ferro_test_support::{TempDir, run_ok};

/// The image's virtual size as qemu-img reads it.
fn virtual_size(image: &str) -> u64 {
    let info: serde_json::Value = serde_json::from_str(&run_ok("qemu-img", &["info", "--output=json", image])).expect("JSON");
    info["virtual-size"].as_u64().expect("virtual-size")
}

#[test]
fn create_takes_every_size_of_the_grammar_and_refuses_the_rest() {
    let dir = TempDir::new("img-sizes");
    for (i, &(text, bytes)) in SIZES.iter().enumerate() {
        let file = dir.join(format!("ok{i}.raw"));
        let o = ferro(&["img", "create", "-q", "-f", "raw", file.to_str().unwrap(), text]);
        assert!(o.status.success(), "{text:?}: {}", stderr(&o));
        assert_eq!(std::fs::metadata(&file).unwrap().len(), bytes, "{text:?}");
        let file = dir.join(format!("opt{i}.qcow2"));
        let o = ferro(&["img", "create", "-q", "-f", "qcow2", "-o", &format!("size={text}"), file.to_str().unwrap()]);
        assert!(o.status.success(), "-o size={text:?}: {}", stderr(&o));
        assert_eq!(virtual_size(file.to_str().unwrap()), bytes, "-o size={text:?}");
    }
    for &text in NOT_SIZES {
        let file = dir.join("refused.raw");
        // After `--` a size such as -1G is a size, not an option.
        let o = ferro(&["img", "create", "-q", "-f", "raw", "--", file.to_str().unwrap(), text]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{text:?}: {err}");
        assert!(err.starts_with("ferro img: invalid size: ") && err.contains(&format!("{text:?}")), "{text:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!file.exists(), "{text:?} left a file");
    }
}

#[test]
fn resize_takes_a_size_or_a_signed_delta() {
    let dir = TempDir::new("img-resize");
    let file = dir.join("r.qcow2");
    let path = file.to_str().unwrap();
    assert!(ferro(&["img", "create", "-q", "-f", "qcow2", path, "1G"]).status.success());
    for (shrink, spec, bytes) in [
        (false, "+1G", 2 << 30),
        (false, "+0.5G", 5 << 29),
        (true, "-1G", 3 << 29),
        (true, "512MiB", 512 << 20),
        (false, "4G", 4 << 30),
    ] {
        let mut args = vec!["img", "resize", "-q"];
        if shrink {
            args.push("--shrink");
        }
        args.extend([path, spec]);
        let o = ferro(&args);
        assert!(o.status.success(), "{spec}: {}", stderr(&o));
        assert_eq!(virtual_size(path), bytes, "{spec}");
    }
    for (spec, why) in [("-1G", "--shrink"), ("+lots", "invalid size"), ("-", "invalid size"), ("+-1G", "invalid size")] {
        let o = ferro(&["img", "resize", "-q", path, spec]);
        assert_eq!(o.status.code(), Some(1), "{spec}");
        assert!(stderr(&o).contains(why), "{spec}: {}", stderr(&o));
    }
    assert_eq!(virtual_size(path), 4 << 30, "refused resizes change nothing");
    run_ok("qemu-img", &["check", "-q", path]);
}
