//! cloud-init NoCloud seeds: what dosfstools and blkid see in the volume we write, and the same
//! inputs giving the same bytes.

use ferro_images::seed::Seed;
use ferro_test_support::{TempDir, run_ok};
use std::io::Read;

#[test]
fn seed_is_a_clean_vfat_labelled_cidata_with_the_three_files() {
    let s = TempDir::new("img-seed");
    let seed = Seed {
        meta_data: Seed::default_meta_data("iid-1234", "web1"),
        user_data: "#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 AAAA test\n".to_string(),
        network_config: Some("version: 2\nethernets: {}\n".to_string()),
    };
    let path = s.join("seed.img");
    seed.write(&path).expect("write seed");
    let path_str = path.to_str().expect("utf-8");
    let fsck = run_ok("fsck.vfat", &["-n", path_str]);
    assert!(fsck.contains(" files, "), "{fsck}");
    let blkid = run_ok("blkid", &["-p", "-o", "export", path_str]);
    assert!(blkid.contains("TYPE=vfat") && blkid.contains("LABEL=cidata"), "{blkid}");

    let file = std::fs::File::open(&path).expect("open");
    let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).expect("mount");
    for (name, want) in [("meta-data", &seed.meta_data), ("user-data", &seed.user_data), ("network-config", seed.network_config.as_ref().expect("n"))] {
        let mut text = String::new();
        fs.root_dir().open_file(name).expect(name).read_to_string(&mut text).expect("read");
        assert_eq!(&text, want, "{name}");
    }
    assert!(seed.meta_data.contains("instance-id: iid-1234") && seed.meta_data.contains("local-hostname: web1"));

    let again = s.join("again.img");
    seed.write(&again).expect("write again");
    assert!(std::fs::read(&path).expect("a") == std::fs::read(&again).expect("b"), "same inputs, same bytes");
    let big = Seed { user_data: "x".repeat(300 << 10), ..seed };
    assert!(big.write(&s.join("big.img")).unwrap_err().to_string().contains("user-data is 307200 bytes"));
}
