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
    let s = Scratch::new("ours");
    for (cluster, rbits, v2) in [(65536u64, 16u32, false), (512, 16, false), (2 * MIB, 16, false), (4096, 1, false), (65536, 64, false), (65536, 16, true)] {
        let q = s.path("a.qcow2");
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
        let r = s.path("model.raw");
        std::fs::write(&r, &model).expect("write model");
        assert_qemu_identical(&q, &r);
        assert_eq!(read_all(&q), model, "our read-back, cluster {cluster} refcount bits {rbits}");
    }
}
