//! `cargo bench -p ferro-block --bench vs_qemu`: sequential read/write throughput of the block
//! layer beside `qemu-img bench` on the same files in the same run (queue depth 1, page cache,
//! as our API is synchronous). qemu-img bench has no random mode, so only sequential rows
//! are compared. Prints one row per case with the ratio ours/qemu (above 1.0 = we are faster).
use ferro_block::{CreateOptions, Format, create, open};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const SIZE: u64 = 256 << 20;

fn ours(path: &Path, fmt: Format, write: bool, bs: usize, count: u64) -> f64 {
    let mut img = open(path, Some(fmt), !write).expect("open");
    let mut buf = vec![0x5au8; bs];
    let t = Instant::now();
    let mut off = 0;
    for _ in 0..count {
        if write {
            img.write_at(&buf, off).expect("write");
        } else {
            img.read_at(&mut buf, off).expect("read");
        }
        off = (off + bs as u64) % SIZE;
    }
    // qemu-img bench's timing ends before its closing flush; so does ours.
    let elapsed = t.elapsed().as_secs_f64();
    img.flush().expect("flush");
    elapsed
}

fn qemu(path: &Path, fmt: Format, write: bool, bs: usize, count: u64) -> f64 {
    let mut args = vec!["bench".to_string(), "-f".into(), fmt.name().into(), "-d".into(), "1".into(), "-t".into(), "writeback".into()];
    args.extend(["-c".into(), count.to_string(), "-s".into(), bs.to_string()]);
    if write {
        args.push("-w".into());
    }
    args.push(path.display().to_string());
    let out = Command::new("qemu-img").args(&args).output().expect("qemu-img bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // qemu-img's own timing, which excludes its start-up: "Run completed in 1.234 seconds."
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("Run completed in ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .expect("qemu-img bench timing line")
}

fn fresh(dir: &Path, fmt: Format, backing: bool) -> std::path::PathBuf {
    let p = dir.join(format!("bench.{}", fmt.name()));
    let mut o = CreateOptions::new(fmt, Some(SIZE));
    if backing {
        let base = dir.join("base.raw");
        std::fs::write(&base, vec![0x11u8; SIZE as usize]).expect("base");
        o.backing_file = Some(base.display().to_string());
        o.backing_format = Some(Format::Raw);
    }
    create(&p, &o).expect("create");
    p
}

fn main() {
    let dir = std::env::temp_dir().join(format!("ferro-block-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    println!("{:<34} {:>10} {:>10} {:>7}", "case (sequential, depth 1)", "ours MB/s", "qemu MB/s", "ratio");
    for (fmt, backing) in [(Format::Raw, false), (Format::Qcow2, false), (Format::Qcow2, true)] {
        for bs in [4096usize, 65536] {
            let count = SIZE / bs as u64;
            for write in [true, false] {
                // Writes go to a fresh image each (allocating); reads go over a fully written one.
                let mb = (count * bs as u64) as f64 / 1e6;
                let (o, q) = if write {
                    let q = qemu(&fresh(&dir, fmt, backing), fmt, true, bs, count);
                    (ours(&fresh(&dir, fmt, backing), fmt, true, bs, count), q)
                } else {
                    let p = fresh(&dir, fmt, backing);
                    ours(&p, fmt, true, 1 << 20, SIZE >> 20);
                    (ours(&p, fmt, false, bs, count), qemu(&p, fmt, false, bs, count))
                };
                let name = format!("{} {}{} {}k", fmt.name(), if backing { "+backing " } else { "" }, if write { "write" } else { "read" }, bs / 1024);
                println!("{name:<34} {:>10.0} {:>10.0} {:>7.2}", mb / o, mb / q, q / o);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
