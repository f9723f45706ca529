//! OVF/OVA import and export against the real daemon and the `ferro` CLI: our export imports back
//! to the same configuration and bytes (qemu-img compares the disks and checks the VMDKs);
//! packages written by hand in the shapes VirtualBox and VMware export (OVF 1.0) and in OVF 2.0
//! import; manifests that do not match and hostile archives are refused, leaving nothing behind.

use ferro_test_support::daemon::{Api, Daemon, Home};
use ferro_test_support::{TempDir, run_ok};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Pool "default" in `$home/images`.
fn pool(api: &Api, home: &Home) -> PathBuf {
    let target = home.path().join("images");
    let def = json!({ "name": "default", "type": "dir", "target": p(&target) }).to_string();
    api.expect("POST", "/v1/pools", Some(&def), 201);
    api.expect("POST", "/v1/pools/default/build", None, 200);
    api.expect("POST", "/v1/pools/default/start", None, 200);
    target
}

/// Deterministic bytes.
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A raw disk of `size` bytes with data at a few places.
fn raw_disk(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    d[..MIB as usize].copy_from_slice(&data(seed, MIB as usize));
    let mid = (size / 2) as usize;
    d[mid..mid + 70_000].copy_from_slice(&data(seed + 1, 70_000));
    let end = d.len();
    d[end - 4096..].fill(0xee);
    std::fs::write(path, &d).expect("raw disk");
    d
}

fn qemu_identical(a: &Path, b: &Path) {
    let out = std::process::Command::new("qemu-img").args(["compare", p(a), p(b)]).output().expect("qemu-img (scripts/setup.sh)");
    assert!(out.status.success(), "qemu-img compare {} {}: {}{}", a.display(), b.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn volume_capacity(api: &Api, vol: &str) -> u64 {
    api.expect("GET", &format!("/v1/pools/default/volumes/{vol}"), None, 200)["capacity"].as_u64().expect("capacity")
}

#[test]
fn export_then_import_keeps_configuration_and_bytes() {
    let home = Home::new("ovf-round");
    let d = Daemon::start(&home);
    let api = d.api();
    let images = pool(&api, &home);
    let s = TempDir::new("ovf-round");
    let first = s.join("first.raw");
    raw_disk(&first, 40 * MIB, 1);
    let second = s.join("second.raw");
    raw_disk(&second, 8 * MIB, 2);
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", p(&first), p(&images.join("orig.qcow2"))]);
    std::fs::copy(&second, images.join("orig-data.raw")).expect("copy");
    let toml = "name = \"orig\"\nmemory = \"384M\"\nvcpus = 2\n[boot]\nfrom = \"disk\"\n\
                [[disk]]\npool = \"default\"\nvolume = \"orig.qcow2\"\nformat = \"qcow2\"\n\
                [[disk]]\npool = \"default\"\nvolume = \"orig-data.raw\"\nformat = \"raw\"\n\
                [[nic]]\ntap = \"tap-orig\"\nmac = \"52:54:00:aa:bb:cc\"\n";
    api.expect("POST", "/v1/domains", Some(toml), 201);

    let ova = s.join("orig.ova");
    let out = d.ferro_ok(&["export-ovf", "orig", p(&ova)]);
    assert!(out.contains("exported"), "{out}");
    // An OVA: descriptor first, then the manifest, then the disks; every digest right.
    let listing: Vec<String> = run_ok("tar", &["tf", p(&ova)]).lines().map(str::to_string).collect();
    assert_eq!(listing, ["orig.ovf", "orig.mf", "orig-disk1.vmdk", "orig-disk2.vmdk"]);
    let unpacked = s.join("unpacked");
    std::fs::create_dir(&unpacked).expect("dir");
    run_ok("tar", &["xf", p(&ova), "-C", p(&unpacked)]);
    let manifest = std::fs::read_to_string(unpacked.join("orig.mf")).expect("manifest");
    for name in ["orig.ovf", "orig-disk1.vmdk", "orig-disk2.vmdk"] {
        let sum = run_ok("sha256sum", &[p(&unpacked.join(name))]);
        let hex = sum.split_whitespace().next().expect("digest");
        assert!(manifest.contains(&format!("SHA256({name})= {hex}")), "{manifest}");
    }
    for (vmdk, original) in [("orig-disk1.vmdk", &first), ("orig-disk2.vmdk", &second)] {
        let vmdk = unpacked.join(vmdk);
        let info = run_ok("qemu-img", &["info", "--output", "json", p(&vmdk)]);
        assert!(info.contains("\"create-type\": \"streamOptimized\""), "{info}");
        run_ok("qemu-img", &["check", p(&vmdk)]);
        qemu_identical(&vmdk, original);
    }
    let descriptor = std::fs::read_to_string(unpacked.join("orig.ovf")).expect("ovf");
    for want in ["<rasd:VirtualQuantity>384</rasd:VirtualQuantity>", "<rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>", "vmdk.html#streamOptimized", "<rasd:Connection>tap-orig</rasd:Connection>"] {
        assert!(descriptor.contains(want), "{want} missing: {descriptor}");
    }

    // Import the OVA, and the same package unpacked as .ovf + files.
    for (source, name) in [(ova.clone(), "copy"), (unpacked.join("orig.ovf"), "copy2")] {
        let out = d.ferro_ok(&["import-ovf", p(&source), "--name", name]);
        assert!(out.contains(&format!("Domain '{name}' imported")), "{out}");
        let info = api.expect("GET", &format!("/v1/domains/{name}"), None, 200);
        let orig = api.expect("GET", "/v1/domains/orig", None, 200);
        assert_eq!(info["memory_bytes"], orig["memory_bytes"]);
        assert_eq!(info["vcpus"], orig["vcpus"]);
        assert_eq!(info["config"]["nic"], orig["config"]["nic"], "NIC tap and MAC come back");
        assert_eq!(info["config"]["boot"], orig["config"]["boot"]);
        let disks = info["config"]["disk"].as_array().expect("disks").clone();
        assert_eq!(disks.len(), 2);
        for (i, (disk, original)) in disks.iter().zip([&first, &second]).enumerate() {
            let vol = disk["volume"].as_str().expect("volume");
            assert_eq!(vol, format!("{name}-disk{}.qcow2", i + 1));
            assert_eq!(disk["format"], "qcow2");
            assert_eq!(volume_capacity(&api, vol), std::fs::metadata(original).expect("stat").len());
            run_ok("qemu-img", &["check", p(&images.join(vol))]);
            qemu_identical(&images.join(vol), original);
        }
    }
    let jobs = api.expect("GET", "/v1/jobs", None, 200);
    let kinds: Vec<&str> = jobs.as_array().expect("jobs").iter().filter_map(|j| j["kind"].as_str()).collect();
    assert!(kinds.contains(&"export-ovf") && kinds.contains(&"import-ovf"), "{kinds:?}");

    // Nothing is written over an existing target.
    let e = d.ferro(&["export-ovf", "orig", p(&ova)]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("already exists"), "{}", String::from_utf8_lossy(&e.stderr));
}

/// A package member: its name as raw bytes in the tar header, its type and its bytes.
struct Member {
    name: Vec<u8>,
    kind: tar::EntryType,
    bytes: Vec<u8>,
}

fn file(name: &str, bytes: Vec<u8>) -> Member {
    Member { name: name.as_bytes().to_vec(), kind: tar::EntryType::Regular, bytes }
}

/// Writes an OVA by hand, names and types exactly as given (the tar crate's builder would refuse
/// the hostile ones).
fn write_ova(path: &Path, members: &[Member]) {
    let out = std::fs::File::create(path).expect("create ova");
    let mut b = tar::Builder::new(out);
    for m in members {
        let mut h = tar::Header::new_ustar();
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..m.name.len()].copy_from_slice(&m.name);
        h.set_size(m.bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(m.kind);
        if m.kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/passwd").expect("link name");
        }
        h.set_cksum();
        b.append(&h, m.bytes.as_slice()).expect("append");
    }
    b.into_inner().expect("finish ova");
}

fn sha(algo: &str, bytes: &[u8], s: &TempDir) -> String {
    let f = s.join("hash-me");
    std::fs::write(&f, bytes).expect("write");
    let tool = if algo == "SHA1" { "sha1sum" } else { "sha256sum" };
    run_ok(tool, &[p(&f)]).split_whitespace().next().expect("digest").to_string()
}

fn manifest(algo: &str, files: &[(&str, &[u8])], s: &TempDir) -> Vec<u8> {
    files.iter().map(|(n, b)| format!("{algo}({n})= {}\n", sha(algo, b, s))).collect::<String>().into_bytes()
}

/// A streamOptimized VMDK of a raw disk, as VirtualBox and VMware ship them (made by qemu-img).
fn vmdk_of(raw: &Path, s: &TempDir) -> Vec<u8> {
    let out = s.join("peer.vmdk");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", p(raw), p(&out)]);
    std::fs::read(&out).expect("vmdk")
}

/// VirtualBox's export: OVF 1.0, memory in "MegaBytes", `/disk/` host resources, an IDE and a SATA
/// controller, a NIC on "NAT", its own machine section marked optional, a SHA1 manifest.
fn virtualbox_ovf(disk_size: u64, vmdk_len: usize) -> String {
    format!(
        r#"<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="vbox-disk001.vmdk" ovf:size="{vmdk_len}"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="{disk_size}" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" vbox:uuid="3b7a1b7c-1111-2222-3333-444455556666"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="Debian VBox">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>Debian VBox</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>3 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>3 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>3</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>768 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>768 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>768</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>ideController0</rasd:Caption>
        <rasd:Description>IDE Controller</rasd:Description>
        <rasd:ElementName>ideController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>PIIX4</rasd:ResourceSubType>
        <rasd:ResourceType>5</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>8</rasd:InstanceID>
        <rasd:Parent>5</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.16-linux" uuid="{{3b7a1b7c-0000-2222-3333-444455556666}}" name="Debian VBox">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
    </vbox:Machine>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// VMware's export (ovftool): OVF 1.0 with the vmw namespace, capacity in "byte * 2^20", memory in
/// "byte * 2^20", `ovf:/disk/` host resources on an lsilogic controller, vmw:Config elements, a
/// NIC on "VM Network", a SHA256 manifest.
fn vmware_ovf(disk_mib: u64, vmdk_len: usize) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="vmware-1.vmdk" ovf:id="file1" ovf:size="{vmdk_len}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{disk_mib}" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="1048576"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="vmware-appliance">
    <Info>A virtual machine</Info>
    <Name>vmware-appliance</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian11_64Guest">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>vmware-appliance</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">2</vmw:CoresPerSocket>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>2048MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI Controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>VirtualVideoCard</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceType>24</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="enable3DSupport" vmw:value="false"/>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
        <vmw:Config ovf:required="false" vmw:key="backing.writeThrough" vmw:value="false"/>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on &quot;VM Network&quot;</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// OVF 2.0: the envelope/2 namespace, disks as StorageItem and NICs as EthernetPortItem.
fn ovf2(disk_bytes: u64, vmdk_len: usize) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/2" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:sasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData" xmlns:epasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References><File ovf:id="f1" ovf:href="disk.vmdk" ovf:size="{vmdk_len}"/></References>
  <DiskSection><Info>Disks</Info><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="{disk_bytes}" ovf:capacityAllocationUnits="byte"/></DiskSection>
  <NetworkSection><Info>Networks</Info><Network ovf:name="lan"><Description>lan</Description></Network></NetworkSection>
  <VirtualSystem ovf:id="two">
    <Info>OVF 2</Info>
    <VirtualHardwareSection>
      <Info>Hardware</Info>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <StorageItem><sasd:HostResource>ovf:/disk/d1</sasd:HostResource><sasd:InstanceID>3</sasd:InstanceID><sasd:ResourceType>17</sasd:ResourceType></StorageItem>
      <EthernetPortItem><epasd:Address>52:54:00:01:02:03</epasd:Address><epasd:Connection>lan</epasd:Connection><epasd:InstanceID>4</epasd:InstanceID><epasd:ResourceType>10</epasd:ResourceType></EthernetPortItem>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// Starts an import through the API; returns the HTTP status and the answer.
fn import(api: &Api, source: &Path, name: &str, map: Value) -> (u16, Value) {
    let body = json!({ "source": p(source), "name": name, "network_map": map }).to_string();
    api.call("POST", "/v1/ovf/import", Some(&body))
}

#[test]
fn virtualbox_vmware_and_ovf2_packages_import() {
    let home = Home::new("ovf-peers");
    let d = Daemon::start(&home);
    let api = d.api();
    let images = pool(&api, &home);
    let s = TempDir::new("ovf-peers");
    let raw = s.join("disk.raw");
    let size = 24 * MIB;
    raw_disk(&raw, size, 7);
    let vmdk = vmdk_of(&raw, &s);

    let vbox = virtualbox_ovf(size, vmdk.len());
    let mf = manifest("SHA1", &[("vbox.ovf", vbox.as_bytes()), ("vbox-disk001.vmdk", &vmdk)], &s);
    let vbox_ova = s.join("vbox.ova");
    write_ova(&vbox_ova, &[file("vbox.ovf", vbox.clone().into_bytes()), file("vbox.mf", mf), file("vbox-disk001.vmdk", vmdk.clone())]);

    let vmware = vmware_ovf(size / MIB, vmdk.len());
    let mf = manifest("SHA256", &[("vmware.ovf", vmware.as_bytes()), ("vmware-1.vmdk", &vmdk)], &s);
    let vmware_ova = s.join("vmware.ova");
    write_ova(&vmware_ova, &[file("vmware.ovf", vmware.into_bytes()), file("vmware.mf", mf), file("vmware-1.vmdk", vmdk.clone())]);

    // OVF 2.0 unpacked (no manifest), with a declared capacity larger than the VMDK's: the volume
    // is grown to it.
    let two = s.join("two");
    std::fs::create_dir(&two).expect("dir");
    std::fs::write(two.join("two.ovf"), ovf2(size + 8 * MIB, vmdk.len())).expect("ovf");
    std::fs::write(two.join("disk.vmdk"), &vmdk).expect("vmdk");

    let cases = [
        (vbox_ova.clone(), "vbox", json!({ "NAT": "tap-nat" }), 3, 768 * MIB, size, json!([{ "tap": "tap-nat" }])),
        (vmware_ova.clone(), "vmw", json!({ "VM Network": "none" }), 2, 2048 * MIB, size, json!(null)),
        (two.join("two.ovf"), "two", json!({ "lan": "tap-lan" }), 1, 1024 * MIB, size + 8 * MIB, json!([{ "tap": "tap-lan", "mac": "52:54:00:01:02:03" }])),
    ];
    for (source, name, map, vcpus, memory, capacity, nics) in cases {
        let (status, job) = import(&api, &source, name, map);
        assert_eq!(status, 202, "{name}: {job}");
        let job = api.wait_job(job["id"].as_u64().expect("id"));
        assert_eq!(job["state"], "completed", "{name}: {job}");
        let info = api.expect("GET", &format!("/v1/domains/{name}"), None, 200);
        assert_eq!(info["vcpus"], vcpus, "{name}");
        assert_eq!(info["memory_bytes"], memory, "{name}");
        assert_eq!(info["config"]["boot"]["from"], "disk", "{name}");
        // A NIC the package gave no MAC got one when the domain was defined.
        let mut got = info["config"].get("nic").cloned().unwrap_or(Value::Null);
        for (nic, expected) in got.as_array_mut().into_iter().flatten().zip(nics.as_array().into_iter().flatten()) {
            if expected.get("mac").is_none() {
                let mac = nic.as_object_mut().and_then(|o| o.remove("mac"));
                assert!(mac.as_ref().and_then(Value::as_str).is_some_and(|m| m.starts_with("52:54:00:")), "{name}: {mac:?}");
            }
        }
        assert_eq!(got, nics, "{name}");
        let vol = format!("{name}-disk1.qcow2");
        assert_eq!(volume_capacity(&api, &vol), capacity, "{name}");
        run_ok("qemu-img", &["check", p(&images.join(&vol))]);
        qemu_identical(&images.join(&vol), &raw);
    }

    // Without a network map, a network that is no tap name is refused, naming the fix.
    let (status, e) = import(&api, &vmware_ova, "vmw2", json!({}));
    assert_eq!(status, 400);
    assert!(e["message"].as_str().unwrap_or_default().contains("--network-map \"VM Network=TAP\""), "{e}");
}

/// Every file directly in the pool's directory (hidden ones too).
fn pool_files(images: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(images).expect("pool dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn bad_manifests_and_hostile_archives_are_refused_without_writing() {
    let home = Home::new("ovf-hostile");
    let d = Daemon::start(&home);
    let api = d.api();
    let images = pool(&api, &home);
    let s = TempDir::new("ovf-hostile");
    let raw = s.join("disk.raw");
    let size = 8 * MIB;
    raw_disk(&raw, size, 9);
    let vmdk = vmdk_of(&raw, &s);
    let ovf = virtualbox_ovf(size, vmdk.len());
    let good_mf = manifest("SHA256", &[("vbox.ovf", ovf.as_bytes()), ("vbox-disk001.vmdk", &vmdk)], &s);
    let map = json!({ "NAT": "none" });

    // Refused by the job, after the request was accepted: digests and sizes are checked before
    // anything is written.
    let mut flipped = vmdk.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x40;
    let missing_disk = manifest("SHA256", &[("vbox.ovf", ovf.as_bytes())], &s);
    let small = virtualbox_ovf(size / 2, vmdk.len());
    let small_mf = manifest("SHA256", &[("vbox.ovf", small.as_bytes()), ("vbox-disk001.vmdk", &vmdk)], &s);
    let lying = virtualbox_ovf(size, vmdk.len() + 512);
    let job_refusals: Vec<(&str, Vec<Member>, &str)> = vec![
        ("digest", vec![file("vbox.ovf", ovf.clone().into_bytes()), file("vbox.mf", good_mf.clone()), file("vbox-disk001.vmdk", flipped)], "does not match the manifest"),
        ("unlisted", vec![file("vbox.ovf", ovf.clone().into_bytes()), file("vbox.mf", missing_disk), file("vbox-disk001.vmdk", vmdk.clone())], "does not list vbox-disk001.vmdk"),
        ("declared size", vec![file("vbox.ovf", lying.into_bytes()), file("vbox-disk001.vmdk", vmdk.clone())], "but the descriptor says"),
        ("capacity", vec![file("vbox.ovf", small.into_bytes()), file("vbox.mf", small_mf), file("vbox-disk001.vmdk", vmdk.clone())], "larger than the"),
    ];
    for (what, members, want) in job_refusals {
        let ova = s.join(format!("{}.ova", what.replace(' ', "-")));
        write_ova(&ova, &members);
        let (status, job) = import(&api, &ova, "bad", map.clone());
        assert_eq!(status, 202, "{what}: {job}");
        let job = api.wait_job(job["id"].as_u64().expect("id"));
        assert_eq!(job["state"], "failed", "{what}: {job}");
        assert!(job["error"].as_str().unwrap_or_default().contains(want), "{what}: {job}");
        assert!(pool_files(&images).is_empty(), "{what}: left {:?}", pool_files(&images));
        api.expect("GET", "/v1/domains/bad", None, 404);
    }

    // Refused at the request: the archive's shape.
    let many: Vec<Member> = (0..300).map(|i| file(&format!("f{i}"), vec![0u8; 1])).collect();
    let huge = format!("{ovf}<!--{}-->", "x".repeat(1 << 20));
    let request_refusals: Vec<(&str, Vec<Member>, &str)> = vec![
        ("dotdot", vec![file("vbox.ovf", ovf.clone().into_bytes()), file("../vbox-disk001.vmdk", vmdk.clone())], "not a plain file name"),
        ("absolute", vec![file("vbox.ovf", ovf.clone().into_bytes()), file("/tmp/vbox-disk001.vmdk", vmdk.clone())], "not a plain file name"),
        ("subdir", vec![file("vbox.ovf", ovf.clone().into_bytes()), file("d/vbox-disk001.vmdk", vmdk.clone())], "not a plain file name"),
        (
            "symlink",
            vec![file("vbox.ovf", ovf.clone().into_bytes()), Member { name: b"vbox-disk001.vmdk".to_vec(), kind: tar::EntryType::Symlink, bytes: Vec::new() }],
            "links, directories and devices are refused",
        ),
        (
            "hardlink",
            vec![file("vbox.ovf", ovf.clone().into_bytes()), Member { name: b"vbox-disk001.vmdk".to_vec(), kind: tar::EntryType::Link, bytes: Vec::new() }],
            "links, directories and devices are refused",
        ),
        ("bomb", many, "more than 256 files"),
        ("huge descriptor", vec![file("vbox.ovf", huge.into_bytes())], "at most"),
        ("no descriptor", vec![file("vbox-disk001.vmdk", vmdk.clone())], "no .ovf descriptor"),
        ("twice", vec![file("vbox.ovf", ovf.clone().into_bytes()), file("vbox.ovf", ovf.clone().into_bytes())], "appears twice"),
        ("two descriptors", vec![file("a.ovf", ovf.clone().into_bytes()), file("b.ovf", ovf.clone().into_bytes())], "more than one .ovf"),
    ];
    for (what, members, want) in request_refusals {
        let ova = s.join(format!("{}.ova", what.replace(' ', "-")));
        write_ova(&ova, &members);
        let (status, e) = import(&api, &ova, "bad", map.clone());
        assert_eq!(status, 400, "{what}: {e}");
        assert!(e["message"].as_str().unwrap_or_default().contains(want), "{what}: {e}");
    }
    // A member whose header claims more bytes than the archive has.
    let ova = s.join("truncated.ova");
    write_ova(&ova, &[file("vbox.ovf", ovf.clone().into_bytes()), file("vbox-disk001.vmdk", vmdk.clone())]);
    let len = std::fs::metadata(&ova).expect("stat").len();
    std::fs::OpenOptions::new().write(true).open(&ova).and_then(|f| f.set_len(len - 4096 - vmdk.len() as u64 / 2)).expect("truncate");
    let (status, e) = import(&api, &ova, "bad", map.clone());
    assert_eq!(status, 400, "truncated: {e}");
    assert!(e["message"].as_str().unwrap_or_default().contains("archive"), "truncated: {e}");

    assert!(pool_files(&images).is_empty(), "left {:?}", pool_files(&images));
    assert!(!s.path().parent().expect("tmp").join("vbox-disk001.vmdk").exists() && !Path::new("/tmp/vbox-disk001.vmdk").exists());
    let domains = api.expect("GET", "/v1/domains", None, 200);
    assert_eq!(domains.as_array().map(Vec::len), Some(0), "{domains}");
}
