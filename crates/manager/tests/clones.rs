//! Clones and templates under a real ferrod, with the `virtio` test guest (its disk write and its
//! NIC on a bridge in a network namespace the test makes) and qemu-img as the peer: full and
//! linked clones start with their own uuid and MAC, their writes stay in their own disks, the
//! source (a template) never changes, ten linked clones of one template run at once, and a
//! template cannot start or be undefined while linked clones use it. REST answers are checked
//! against openapi.json.

use ferro_test_support::qemu::{identical, img as qemu_img, img_ok as qemu_img_ok, io as qemu_io};
use ferro_test_support::daemon::{Daemon, Home, read_console};
use ferro_test_support::net::Netns;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const HOST_IP: &str = "10.0.0.1";

fn check_clean(image: &Path) {
    let out = qemu_img(&["check", image.to_str().unwrap()]);
    assert!(out.status.success(), "qemu-img check {}: {out:?}", image.display());
}

fn info(image: &Path) -> Value {
    serde_json::from_str(&qemu_img_ok(&["info", "--force-share", "--output=json", image.to_str().unwrap()])).unwrap()
}

/// The ranges of the top layer of `image` that hold data (not what its backing file holds).
fn top_layer(image: &Path) -> Vec<(u64, u64)> {
    let map: Value = serde_json::from_str(&qemu_img_ok(&["map", "--force-share", "--output=json", image.to_str().unwrap()])).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn ferro_err(d: &Daemon, args: &[&str]) -> String {
    let out = d.ferro(args);
    assert!(!out.status.success(), "ferro {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn domain(d: &Daemon, name: &str) -> Value {
    d.api().expect("GET", &format!("/v1/domains/{name}"), None, 200)
}

fn mac_of(info: &Value) -> String {
    info["config"]["nic"][0]["mac"].as_str().expect("the NIC has a MAC").to_string()
}

/// The file of a domain's first disk, a volume of pool `p` at `pool_dir`.
fn disk_of(info: &Value, pool_dir: &Path) -> PathBuf {
    let disk = &info["config"]["disk"][0];
    assert_eq!(disk["pool"], "p", "{disk}");
    pool_dir.join(disk["volume"].as_str().unwrap())
}

/// Waits until a started domain's guest is through its checks, which wrote its pattern at
/// 8 MiB of its disk and pinged the host through its NIC; returns the MAC the guest saw.
fn guest_passed(d: &Daemon, name: &str) -> String {
    let mut console = d.console(name);
    let out = read_console(&mut console, "virtio: all devices passed", Duration::from_secs(60));
    assert!(out.contains(&format!("icmp echo reply from {HOST_IP}")), "{name}: {out}");
    let at = out.find("virtio-net: mac ").expect("the guest printed its MAC") + "virtio-net: mac ".len();
    out[at..at + 17].to_string()
}

/// Gives a clone its own guest address (the clones of one template share its command line).
fn readdress(d: &Daemon, home: &Home, name: &str, me: &str) {
    let text = d.ferro_ok(&["dumpconfig", name]);
    assert!(text.contains("net.me=10.0.0.2"), "{text}");
    let file = home.path().join(format!("{name}.toml"));
    std::fs::write(&file, text.replace("net.me=10.0.0.2", &format!("net.me={me}"))).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
}

#[test]
fn full_and_linked_clones_run_on_their_own_disks_and_the_template_never_changes() {
    let ns = Netns::new("clone");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let home = Home::new("clones");
    let d = Daemon::start_in(&home, &ns, &["--no-default-network"]);
    let api = d.api();
    let pool_dir = home.path().join("pool");
    d.ferro_ok(&["pool-define-as", "p", "dir", "--target", pool_dir.to_str().unwrap()]);
    d.ferro_ok(&["pool-build", "p"]);
    d.ferro_ok(&["pool-start", "p"]);
    let src_disk = pool_dir.join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", src_disk.to_str().unwrap(), "64M"]);
    qemu_io(&src_disk, "write -P 0x11 0 4M");
    let pristine = home.path().join("pristine.qcow2");
    std::fs::copy(&src_disk, &pristine).unwrap();
    let toml = "name = \"src\"\nmemory = \"64M\"\nvcpus = 1\n[boot]\nguest = \"virtio\"\n\
                cmdline = \"virtio.hold=1 blk.seed=5 blk.sector=16384 net.ip=10.0.0.1 net.me=10.0.0.2\"\n\
                [[disk]]\npool = \"p\"\nvolume = \"src.qcow2\"\nformat = \"qcow2\"\n[[nic]]\nbridge = \"br0\"\n";
    let file = home.path().join("src.toml");
    std::fs::write(&file, toml).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);
    let src = domain(&d, "src");

    // A full clone: a job copying the disk into a new volume; a new uuid and MAC.
    let full: Value = serde_json::from_str(&d.ferro_ok(&["clone", "src", "--name", "full1", "--json"])).unwrap();
    let full_disk = disk_of(&full, &pool_dir);
    assert_eq!(full_disk, pool_dir.join("full1-vda.qcow2"));
    assert_ne!(full["uuid"], src["uuid"]);
    assert_ne!(mac_of(&full), mac_of(&src));
    assert_eq!(full["config"]["boot"], src["config"]["boot"]);
    assert!(identical(&src_disk, &full_disk), "the copy reads as the source");
    assert_eq!(info(&full_disk)["backing-filename"], Value::Null, "a full clone stands alone");
    check_clean(&full_disk);
    let job = d.ferro_ok(&["domjobinfo", "src"]);
    assert!(job.contains("clone") && job.contains("completed"), "{job}");

    // It runs with its own MAC; its writes stay in its disk.
    d.ferro_ok(&["start", "full1"]);
    assert_eq!(guest_passed(&d, "full1"), mac_of(&full), "the guest sees the clone's MAC");
    d.ferro_ok(&["destroy", "full1"]);
    assert!(!identical(&src_disk, &full_disk), "the clone's guest wrote its disk");
    assert!(identical(&src_disk, &pristine), "the source did not see the clone's writes");
    check_clean(&full_disk);

    // Refusals: an existing name, a linked clone of a domain that is no template, a running source.
    let err = ferro_err(&d, &["clone", "src", "--name", "full1"]);
    assert!(err.contains("name: domain full1 already exists"), "{err}");
    let err = ferro_err(&d, &["clone", "src", "--name", "l0", "--linked"]);
    assert!(err.contains("domain src is not a template") && err.contains("ferro template src"), "{err}");
    d.ferro_ok(&["start", "src"]);
    guest_passed(&d, "src");
    let err = ferro_err(&d, &["clone", "src", "--name", "l0"]);
    assert!(err.contains("domain src is running") && err.contains("shut it down first"), "{err}");
    let err = ferro_err(&d, &["template", "src"]);
    assert!(err.contains("shut it down before making it a template"), "{err}");
    d.ferro_ok(&["destroy", "src"]);
    assert!(!std::fs::read_dir(&pool_dir).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("l0")), "refusals made no file");

    // The template: it never starts, its disk is read-only, the list says what it is.
    let out = d.ferro_ok(&["template", "src"]);
    assert_eq!(out.trim(), "Domain 'src' is now a template");
    assert_eq!(std::fs::metadata(&src_disk).unwrap().permissions().mode() & 0o222, 0, "the template's disk is read-only");
    let template_bytes = std::fs::read(&src_disk).unwrap();
    let err = ferro_err(&d, &["start", "src"]);
    assert!(err.contains("domain src is a template") && err.contains("--linked"), "{err}");
    let list = d.ferro_ok(&["list", "--all"]);
    assert!(list.lines().any(|l| l.contains("src") && l.contains("template")), "{list}");
    assert_eq!(domain(&d, "src")["template"], true);
    assert!(d.ferro_ok(&["dominfo", "src"]).contains("Template"), "dominfo says it is a template");
    api.expect("POST", "/v1/domains/src/template", None, 409);
    let err = ferro_err(&d, &["define", file.to_str().unwrap()]);
    assert!(err.contains("domain src is a template"), "{err}");
    // Nothing of ferrod's writes the template's disk: a backup, a volume wipe or delete.
    let err = ferro_err(&d, &["backup-begin", "src", "--target", home.path().join("b").to_str().unwrap()]);
    assert!(err.contains("in use by template src"), "{err}");
    let err = ferro_err(&d, &["vol-wipe", "src.qcow2", "--pool", "p"]);
    assert!(err.contains("in use by template src"), "{err}");
    let err = ferro_err(&d, &["vol-delete", "src.qcow2", "--pool", "p"]);
    assert!(err.contains("in use by template src"), "{err}");

    // A linked clone through the API: at once, a qcow2 overlay backed by the template's disk.
    let body = json!({ "name": "linked0", "linked": true }).to_string();
    let linked = api.expect("POST", "/v1/domains/src/clone", Some(&body), 201);
    let linked_disk = disk_of(&linked, &pool_dir);
    assert_eq!(info(&linked_disk)["full-backing-filename"], src_disk.display().to_string());
    assert_eq!(info(&linked_disk)["backing-filename-format"], "qcow2");
    assert_ne!(mac_of(&linked), mac_of(&src));
    api.expect("POST", "/v1/domains/src/clone", Some(r#"{"name": "x", "full": true}"#), 400);

    // Ten linked clones of the template run at once, each with its own uuid, MAC and overlay
    // (started one after the other: ten guests pinging at once on two cores miss their timeouts).
    let names: Vec<String> = (1..=10).map(|i| format!("linked{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let out = d.ferro_ok(&["clone", "src", "--name", name, "--linked"]);
        assert!(out.contains(&format!("Domain '{name}' created as a linked clone of 'src'")), "{out}");
        readdress(&d, &home, name, &format!("10.0.0.{}", 10 + i));
    }
    let mut seen_macs = vec![mac_of(&src), mac_of(&full)];
    let mut seen_uuids = vec![src["uuid"].clone(), full["uuid"].clone()];
    for name in &names {
        d.ferro_ok(&["start", name]);
        let mac = guest_passed(&d, name);
        let clone = domain(&d, name);
        assert_eq!(mac, mac_of(&clone), "{name}: the guest sees the clone's MAC");
        assert!(!seen_macs.contains(&mac), "{name}: MAC {mac} is not new: {seen_macs:?}");
        assert!(!seen_uuids.contains(&clone["uuid"]), "{name}: uuid {} is not new", clone["uuid"]);
        seen_macs.push(mac);
        seen_uuids.push(clone["uuid"].clone());
    }
    for name in &names {
        assert_eq!(domain(&d, name)["state"], "running", "{name} runs with the nine others");
    }
    for name in &names {
        d.ferro_ok(&["destroy", name]);
    }
    for name in &names {
        let disk = disk_of(&domain(&d, name), &pool_dir);
        check_clean(&disk);
        let written = top_layer(&disk);
        assert!(written.iter().any(|&(off, len)| off <= 8 << 20 && off + len > 8 << 20), "{name}: the guest's write is in its overlay: {written:?}");
    }
    assert!(std::fs::read(&src_disk).unwrap() == template_bytes, "the template's disk is unchanged, byte for byte");
    check_clean(&src_disk);

    // The template stays while linked clones use it; without them it goes, its disk writable again.
    let err = ferro_err(&d, &["undefine", "src"]);
    assert!(err.contains("linked clones use") && err.contains("linked0") && err.contains("linked10"), "{err}");
    for name in names.iter().chain(["linked0".to_string()].iter()) {
        d.ferro_ok(&["undefine", name]);
    }
    d.ferro_ok(&["undefine", "src"]);
    assert_ne!(std::fs::metadata(&src_disk).unwrap().permissions().mode() & 0o200, 0, "the disk is writable again");
}

#[test]
fn a_full_clone_of_a_raw_disk_by_path_gets_its_cloud_init_identity() {
    let home = Home::new("clone-ci");
    let d = Daemon::start(&home);
    let disk = home.path().join("ci.raw");
    let mut data = vec![0u8; 4 << 20];
    data[1 << 20..(1 << 20) + 4096].fill(0x5a);
    std::fs::write(&disk, &data).unwrap();
    let toml = format!(
        "name = \"ci\"\nmemory = \"64M\"\nautostart = true\n[boot]\nguest = \"idle\"\n[[disk]]\npath = \"{}\"\n\
         [cloud_init]\nuser_data = \"#cloud-config\\n\"\nmeta_data = \"instance-id: ci-1\\nlocal-hostname: ci\\n\"\n",
        disk.display()
    );
    let file = home.path().join("ci.toml");
    std::fs::write(&file, toml).unwrap();
    d.ferro_ok(&["define", file.to_str().unwrap()]);

    let clone: Value = serde_json::from_str(&d.ferro_ok(&["clone", "ci", "--name", "ci2", "--json"])).unwrap();
    let copy = home.path().join("ci2-vda.raw");
    assert_eq!(clone["config"]["disk"][0]["path"], copy.display().to_string());
    assert_eq!(clone["config"]["disk"][0]["format"], "raw");
    assert_eq!(std::fs::read(&copy).unwrap(), data, "the copy holds the source's bytes");
    assert_eq!(clone["autostart"], false, "a clone does not start with the host");
    let meta = clone["config"]["cloud_init"]["meta_data"].as_str().unwrap();
    assert!(meta.contains("local-hostname: ci2\n") && !meta.contains("ci-1"), "{meta}");
    assert!(meta.lines().next().unwrap().starts_with("instance-id: "), "{meta}");

    // A file of the new name is never replaced, and the refused clone defines nothing.
    std::fs::write(home.path().join("ci3-vda.raw"), b"mine").unwrap();
    let err = ferro_err(&d, &["clone", "ci", "--name", "ci3"]);
    assert!(err.contains("ci3-vda.raw exists; a clone never replaces a file"), "{err}");
    assert_eq!(std::fs::read(home.path().join("ci3-vda.raw")).unwrap(), b"mine");
    d.api().expect("GET", "/v1/domains/ci3", None, 404);
}
