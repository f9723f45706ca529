//! qcow2 and raw interop with qemu-img/qemu-io as the peer, in both directions.
mod common;
use common::*;
use ferro_block::{CreateOptions, Format, create, open};

const MIB: u64 = 1 << 20;

/// Writes a mix of partial, cross-cluster and large writes; mirrors them into a Vec.
fn scribble(img: &mut dyn ferro_block::DiskImage, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    let writes: [(u64, usize); 7] = [
        (0, 512),
        (4096 + 17, 70_000),
        (size / 2 - 1000, 3000),
        (size - 4096, 4096),
        (3 * MIB + 65_536, 65_536),
        (5 * MIB - 10, 200_000),
        (4096 + 20, 100),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let d = data(seed + i as u64, len);
        img.write_at(&d, off).expect("write");
        model[off as usize..off as usize + len].copy_from_slice(&d);
    }
}

#[test]
fn our_qcow2_passes_qemu_check_and_compare() {
    let s = TempDir::new("block-ours");
    for (cluster, rbits, v2) in [(65536u64, 16u32, false), (512, 16, false), (2 * MIB, 16, false), (4096, 1, false), (65536, 64, false), (65536, 16, true)] {
        let q = s.join("a.qcow2");
        let size = 8 * MIB;
        let mut o = CreateOptions::new(Format::Qcow2, Some(size));
        o.cluster_size = cluster;
        o.refcount_bits = rbits;
        o.compat_v2 = v2;
        create(&q, &o).expect("create");
        let mut model = vec![0u8; size as usize];
        {
            let mut img = open(&q, None, false).expect("open");
            scribble(img.as_mut(), &mut model, cluster);
            img.flush().expect("flush");
        }
        assert_qemu_check_clean(&q);
        let r = s.join("model.raw");
        std::fs::write(&r, &model).expect("write model");
        assert_qemu_identical(&q, &r);
        assert_eq!(read_all(&q), model, "our read-back, cluster {cluster} refcount bits {rbits}");
    }
}

fn p(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn qemu_written_qcow2_reads_back_byte_for_byte() {
    let s = TempDir::new("block-theirs");
    for opts in ["cluster_size=65536", "cluster_size=4096,refcount_bits=8", "compat=0.10", "cluster_size=512"] {
        let q = s.join("q.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, p(&q), "16M"]);
        qemu_io(
            "qcow2",
            &q,
            &[
                "write -P 0xab 0 4k",
                "write -P 0x11 65000 70000",
                "write -P 0x22 5M 1M",
                "write -z 5M 64k",
                "discard 5505024 65536",
                "write -P 0x33 16769024 8192",
            ],
        );
        assert_eq!(read_all(&q), qemu_read_all(&q, &s), "options {opts}");
    }
}

#[test]
fn compressed_clusters_read_like_qemu() {
    let s = TempDir::new("block-compressed");
    let r = s.join("src.raw");
    let mut content = data(7, 3 * MIB as usize);
    content[MIB as usize..2 * MIB as usize].iter_mut().enumerate().for_each(|(i, b)| *b = (i / 1000) as u8);
    std::fs::write(&r, &content).expect("write raw");
    let q = s.join("c.qcow2");
    qemu_img_ok(&["convert", "-c", "-O", "qcow2", p(&r), p(&q)]);
    assert_eq!(read_all(&q), content);
    // Overwriting part of a compressed cluster copies it out and frees the compressed data.
    {
        let mut img = open(&q, None, false).expect("open rw");
        img.write_at(&[0x5a; 100], MIB + 7).expect("write into compressed cluster");
        img.flush().expect("flush");
    }
    content[MIB as usize + 7..MIB as usize + 107].fill(0x5a);
    assert_eq!(read_all(&q), content);
    let out = qemu_img(&["check", p(&q)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn backing_chains_both_ways() {
    let s = TempDir::new("block-chain");
    let size = 4 * MIB;
    // qemu builds raw <- qcow2 <- qcow2 with a relative and an absolute backing name.
    let base = s.join("base.raw");
    std::fs::write(&base, data(1, size as usize)).expect("base");
    let mid = s.join("mid.qcow2");
    let top = s.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p(&mid)]);
    qemu_io("qcow2", &mid, &["write -P 0x44 1M 100k", "write -z 3M 64k"]);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-b", p(&mid), "-F", "qcow2", p(&top)]);
    qemu_io("qcow2", &top, &["write -P 0x55 1100k 10k", "discard 0 64k"]);
    assert_eq!(read_all(&top), qemu_read_all(&top, &s));

    // We build a chain on top of theirs, write partial clusters (copy-on-write from backing).
    let ours = s.join("ours.qcow2");
    let mut o = CreateOptions::new(Format::Qcow2, None);
    o.backing_file = Some("top.qcow2".into());
    o.backing_format = Some(Format::Qcow2);
    create(&ours, &o).expect("create overlay");
    {
        let mut img = open(&ours, None, false).expect("open overlay");
        assert_eq!(img.size(), size);
        img.write_at(&data(9, 3000), 1024 * 1024 + 5000).expect("cow write");
        img.write_zeroes(2 * MIB, 128 * 1024).expect("zeroes over backing");
        img.write_zeroes(2 * MIB + 128 * 1024 + 100, 50).expect("partial zeroes");
        img.discard(3 * MIB + 65536, 65536).expect("discard");
        img.flush().expect("flush");
    }
    assert_qemu_check_clean(&ours);
    let theirs_view = qemu_read_all(&ours, &s);
    assert_eq!(read_all(&ours), theirs_view);
    assert_eq!(&theirs_view[MIB as usize + 5000..MIB as usize + 8000], &data(9, 3000)[..]);
    assert!(theirs_view[2 * MIB as usize..2 * MIB as usize + 128 * 1024].iter().all(|&b| b == 0));
    let info = qemu_img_ok(&["info", "--output", "json", p(&ours)]);
    assert!(info.contains("\"backing-filename\": \"top.qcow2\""), "{info}");
    assert!(info.contains("\"backing-filename-format\": \"qcow2\""), "{info}");
}

#[test]
fn refcount_table_growth_with_small_clusters() {
    let s = TempDir::new("block-grow");
    let q = s.join("g.qcow2");
    let size = 24 * MIB;
    let mut o = CreateOptions::new(Format::Qcow2, Some(size));
    o.cluster_size = 512;
    create(&q, &o).expect("create");
    let content = data(3, size as usize);
    {
        let mut img = open(&q, None, false).expect("open");
        for (i, chunk) in content.chunks(256 * 1024).enumerate() {
            img.write_at(chunk, i as u64 * 256 * 1024).expect("write");
        }
        img.flush().expect("flush");
    }
    assert_qemu_check_clean(&q);
    assert_eq!(qemu_read_all(&q, &s), content);
}

#[test]
fn resize_grows_and_shrinks_like_qemu_sees_it() {
    let s = TempDir::new("block-resize");
    let q = s.join("r.qcow2");
    create(&q, &CreateOptions::new(Format::Qcow2, Some(MIB + 1000))).expect("create");
    {
        let mut img = open(&q, None, false).expect("open");
        img.write_at(&[7; 1000], MIB).expect("write tail");
        img.resize(600 * MIB).expect("grow past one L2 table");
        img.write_at(&[9; 10], 599 * MIB).expect("write far");
        img.resize(MIB + 500).expect("shrink");
        img.resize(2 * MIB).expect("grow again");
        img.flush().expect("flush");
    }
    assert_qemu_check_clean(&q);
    let v = qemu_read_all(&q, &s);
    assert_eq!(v.len() as u64, 2 * MIB);
    assert!(v[MIB as usize..MIB as usize + 500].iter().all(|&b| b == 7));
    assert!(v[MIB as usize + 500..].iter().all(|&b| b == 0), "shrunk-away data must not reappear");
}
