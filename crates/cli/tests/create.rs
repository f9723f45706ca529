//! `ferro create --dry-run`: the TOML definition a table of flag combinations gives, each one
//! accepted by ferrod's own definition parser, and the flags it refuses with a reason.

use ferro_manager::domain::DomainConfig;
use ferro_test_support::TempDir;
use ferro_test_support::vm::{ferro, stderr, stdout};

fn dry_run(args: &[&str]) -> std::process::Output {
    let mut all = vec!["create", "--dry-run"];
    all.extend_from_slice(args);
    ferro(&all)
}

#[test]
fn dry_run_prints_the_definition_for_each_flag_combination() {
    let s = TempDir::new("create-dry-run");
    let user_data = s.join("user-data");
    std::fs::write(&user_data, "#cloud-config\npackages: [nginx]\n").expect("user-data");
    let meta = s.join("meta-data");
    std::fs::write(&meta, "instance-id: i-1\nlocal-hostname: web\n").expect("meta-data");
    let key = s.join("id_ed25519.pub");
    std::fs::write(&key, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake me@host\n").expect("key");
    let ci = format!("user-data={},meta-data={}", user_data.display(), meta.display());
    let ssh = key.display().to_string();
    let table: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--name", "k", "--kernel", "/boot/vmlinux", "--initrd", "/boot/initrd", "--cmdline", "console=ttyS0 quiet"],
            "name = \"k\"\nmemory = \"1G\"\nvcpus = 1\n\n[boot]\nkernel = \"/boot/vmlinux\"\ninitrd = \"/boot/initrd\"\ncmdline = \"console=ttyS0 quiet\"\n".into(),
        ),
        (
            vec!["--name", "web", "--memory", "2048", "--vcpus", "2", "--import", "/img/debian.qcow2", "--network", "tap=tap-web", "--autostart"],
            "name = \"web\"\nmemory = \"2G\"\nvcpus = 2\nautostart = true\n\n[boot]\nfrom = \"disk\"\n\n\
             [[disk]]\npool = \"default\"\nvolume = \"web.qcow2\"\nformat = \"qcow2\"\n\n[[nic]]\ntap = \"tap-web\"\n"
                .into(),
        ),
        (
            vec!["--name", "db", "--memory", "1.5G", "--boot", "disk", "--cmdline", "ro", "--disk", "vol=fast/db-root.raw", "--disk", "size=20G,pool=fast,format=raw", "--pool", "slow", "--disk", "size=512M", "--network", "none"],
            "name = \"db\"\nmemory = \"1536M\"\nvcpus = 1\n\n[boot]\nfrom = \"disk\"\ncmdline = \"ro\"\n\n\
             [[disk]]\npool = \"fast\"\nvolume = \"db-root.raw\"\nformat = \"raw\"\n\n\
             [[disk]]\npool = \"fast\"\nvolume = \"db-1.raw\"\nformat = \"raw\"\n\n\
             [[disk]]\npool = \"slow\"\nvolume = \"db-2.qcow2\"\nformat = \"qcow2\"\n"
                .into(),
        ),
        (
            vec!["--name", "ci", "--import", "/img/cloud.qcow2", "--linked", "--cloud-init", ci.as_str()],
            "name = \"ci\"\nmemory = \"1G\"\nvcpus = 1\n\n[boot]\nfrom = \"disk\"\n\n\
             [[disk]]\npool = \"default\"\nvolume = \"ci.qcow2\"\nformat = \"qcow2\"\n\n\
             [cloud_init]\nuser_data = '''\n#cloud-config\npackages: [nginx]\n'''\nmeta_data = '''\ninstance-id: i-1\nlocal-hostname: web\n'''\n"
                .into(),
        ),
        (
            vec!["--name", "key", "--memory", "512M", "--import", "/img/cloud.raw", "--ssh-key", ssh.as_str(), "--disk", "path=/iso/tools.raw,readonly=on"],
            "name = \"key\"\nmemory = \"512M\"\nvcpus = 1\n\n[boot]\nfrom = \"disk\"\n\n\
             [[disk]]\npool = \"default\"\nvolume = \"key.qcow2\"\nformat = \"qcow2\"\n\n\
             [[disk]]\npath = \"/iso/tools.raw\"\nformat = \"raw\"\nreadonly = true\n\n\
             [cloud_init]\nuser_data = '''\n#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake me@host\n'''\n"
                .into(),
        ),
        (
            vec!["--name", "n", "--kernel", "/k", "--network", "default", "--network", "bridge=br0", "--network", "network=lab"],
            "name = \"n\"\nmemory = \"1G\"\nvcpus = 1\n\n[boot]\nkernel = \"/k\"\n\n\
             [[nic]]\nnetwork = \"default\"\n\n[[nic]]\nbridge = \"br0\"\n\n[[nic]]\nnetwork = \"lab\"\n"
                .into(),
        ),
    ];
    for (args, want) in &table {
        let out = dry_run(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = stdout(&out);
        assert_eq!(&text, want, "{args:?}");
        let parsed = DomainConfig::parse(&text).unwrap_or_else(|e| panic!("{args:?}: ferrod refuses the definition: {e}"));
        assert_eq!(parsed.name, args[1]);
    }

    let refused: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--name", "x"], "nothing to boot"),
        (vec!["--name", "x", "--boot", "disk"], "no disk to boot from"),
        (vec!["--name", "x", "--kernel", "/k", "--memory", "lots"], "--memory"),
        (vec!["--name", "x", "--kernel", "/k", "--disk", "size=10Q"], "--disk size"),
        (vec!["--name", "x", "--kernel", "/k", "--disk", "size=1G,vol=a/b"], "exactly one of size=, vol= or path="),
        (vec!["--name", "x", "--kernel", "/k", "--disk", "vol=nopool"], "expected POOL/VOLUME"),
        (vec!["--name", "x", "--kernel", "/k", "--disk", "size=1G,format=vmdk"], "is not raw or qcow2"),
        (vec!["--name", "x", "--kernel", "/k", "--disk", "size=1G,colour=red"], "unknown option 'colour'"),
        (vec!["--name", "x", "--import", "relative.qcow2"], "not an absolute path"),
        (vec!["--name", "x", "--kernel", "/k", "--network", "vlan=7"], "unknown option \"vlan\""),
        (vec!["--name", "x", "--kernel", "/k", "--network", "bridge="], "the bridge name is empty"),
        (vec!["--name", "x", "--kernel", "/k", "--ssh-key", "/nonexistent.pub"], "cannot read /nonexistent.pub"),
        (vec!["--name", "x", "--kernel", "/k", "--cloud-init", "meta-data=/etc/hostname"], "user-data=FILE is required"),
        (vec!["--name", "x", "--kernel", "/k", "--boot", "disk"], "cannot be used with"),
        (vec!["--name", "x", "--kernel", "/k", "--boot", "net"], "invalid value"),
    ];
    for (args, want) in refused {
        let out = dry_run(&args);
        assert!(!out.status.success(), "{args:?} was accepted: {}", stdout(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    let bad_key = s.join("bad.pub");
    std::fs::write(&bad_key, "-----BEGIN OPENSSH PRIVATE KEY-----\n").expect("bad key");
    let out = dry_run(&["--name", "x", "--kernel", "/k", "--ssh-key", bad_key.to_str().expect("utf-8")]);
    assert!(stderr(&out).contains("is not one OpenSSH public key"), "{}", stderr(&out));
}

/// Without --network a domain joins ferrod's network "default" when there is one (as
/// virt-install does with libvirt's); `--network none` keeps it off. Defining the network
/// changes nothing on the host: it is not started.
#[test]
fn the_default_network_is_used_when_ferrod_has_one() {
    use ferro_test_support::daemon::{Daemon, Home};
    let home = Home::new("create-default-net");
    let d = Daemon::start(&home);
    let create = ["create", "--dry-run", "--name", "w", "--kernel", "/k"];
    assert!(!d.ferro_ok(&create).contains("[[nic]]"), "no default network yet, so no NIC");
    let def = home.path().join("default.toml");
    std::fs::write(&def, "name = \"default\"\nmode = \"nat\"\nbridge = \"fvtest0\"\nip = \"10.231.7.1/24\"\n").expect("network file");
    d.ferro_ok(&["net-define", def.to_str().expect("utf-8")]);
    assert!(d.ferro_ok(&create).ends_with("\n[[nic]]\nnetwork = \"default\"\n"), "{}", d.ferro_ok(&create));
    let mut none = create.to_vec();
    none.extend(["--network", "none"]);
    assert!(!d.ferro_ok(&none).contains("[[nic]]"));
}
