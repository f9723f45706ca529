//! OVF descriptors (DMTF DSP0243, versions 1.x and 2.x): reading the parts a VM needs from an
//! envelope (the virtual system's name, CPUs, memory with its allocation units, disks with their
//! capacity and file, NICs and their networks), writing an envelope VirtualBox and VMware read,
//! and the package manifest (`SHA1(file)= hex` or `SHA256(file)= hex` lines).
//!
//! Descriptors come from strangers: the text is bounded before it is parsed, counts are bounded,
//! every number is checked, and sections marked `ovf:required="true"` that this reader does not
//! know are refused, as the standard asks.

use crate::Error;

/// Largest descriptor read.
pub const MAX_DESCRIPTOR: usize = 1 << 20;
const MAX_ITEMS: usize = 1024;
const MAX_DISKS: usize = 64;
const MAX_NICS: usize = 32;

const OVF1: &str = "http://schemas.dmtf.org/ovf/envelope/1";
const OVF2: &str = "http://schemas.dmtf.org/ovf/envelope/2";

/// A file of the package (`References/File`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub id: String,
    pub href: String,
    pub size: Option<u64>,
}

/// A virtual disk in hardware order, with the package file holding its contents (none: empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub id: String,
    pub file: Option<String>,
    pub capacity: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The network its `Connection` names.
    pub network: String,
    pub mac: Option<String>,
}

/// What a VM needs from an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub name: String,
    pub vcpus: u32,
    pub memory: u64,
    pub files: Vec<FileRef>,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
}

/// Multiplier of a DMTF programmatic unit ("byte * 2^20") or the names VirtualBox and older
/// VMware write ("MegaBytes", "GB").
fn units(text: &str) -> Option<u64> {
    let t: String = text.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_lowercase();
    let named = match t.as_str() {
        "byte" | "bytes" | "b" => Some(1u64),
        "kilobytes" | "kb" | "kib" => Some(1 << 10),
        "megabytes" | "mb" | "mib" => Some(1 << 20),
        "gigabytes" | "gb" | "gib" => Some(1 << 30),
        "terabytes" | "tb" | "tib" => Some(1 << 40),
        _ => None,
    };
    if named.is_some() {
        return named;
    }
    let rest = t.strip_prefix("byte*")?;
    let (base, exp) = rest.split_once('^')?;
    let (base, exp): (u64, u32) = (base.parse().ok()?, exp.parse().ok()?);
    if !matches!(base, 2 | 10 | 1024) {
        return None;
    }
    base.checked_pow(exp)
}

fn number(what: &str, text: &str) -> Result<u64, Error> {
    text.trim().parse().map_err(|_| Error::new(format!("{what}: {text:?} is not a number")))
}

fn scaled(what: &str, value: &str, unit: Option<&str>, default: u64) -> Result<u64, Error> {
    let mult = match unit {
        Some(u) => units(u).ok_or_else(|| Error::new(format!("{what}: unknown allocation unit {u:?}")))?,
        None => default,
    };
    number(what, value)?.checked_mul(mult).ok_or_else(|| Error::new(format!("{what}: {value} x {mult} overflows")))
}

/// Sections this reader knows; an unknown one marked `ovf:required="true"` is refused.
const KNOWN_SECTIONS: &[&str] = &[
    "References",
    "DiskSection",
    "NetworkSection",
    "VirtualSystem",
    "VirtualSystemCollection",
    "VirtualHardwareSection",
    "OperatingSystemSection",
    "ProductSection",
    "EulaSection",
    "AnnotationSection",
    "StartupSection",
    "DeploymentOptionSection",
    "Info",
    "Name",
];

type Node<'a, 'i> = roxmltree::Node<'a, 'i>;

/// An attribute in the envelope's namespace (or without one, as some writers do).
fn attr(n: Node, ns: &str, name: &str) -> Option<String> {
    n.attribute((ns, name)).or_else(|| n.attribute(name)).map(str::to_string)
}

/// The first child element named `name`, in whatever namespace (rasd, sasd and epasd items use
/// the same names).
fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| c.is_element() && c.tag_name().name() == name)
}

fn text_of(n: Node, name: &str) -> Option<String> {
    child(n, name).and_then(|c| c.text()).map(|t| t.trim().to_string())
}

/// Reads an OVF 1.x or 2.x descriptor.
pub fn parse(text: &str) -> Result<Envelope, Error> {
    if text.len() > MAX_DESCRIPTOR {
        return Err(Error::new(format!("OVF descriptor of {} bytes (at most {MAX_DESCRIPTOR} are read)", text.len())));
    }
    let opts = roxmltree::ParsingOptions { allow_dtd: false, nodes_limit: 200_000, ..Default::default() };
    let doc = roxmltree::Document::parse_with_options(text, opts).map_err(|e| Error::new(format!("OVF descriptor is not XML: {e}")))?;
    let root = doc.root_element();
    let ns = root.tag_name().namespace().unwrap_or("");
    if root.tag_name().name() != "Envelope" || !(ns == OVF1 || ns == OVF2) {
        return Err(Error::new(format!("not an OVF envelope (root <{}> in namespace {ns:?})", root.tag_name().name())));
    }

    for section in root.children().filter(|c| c.is_element()) {
        let name = section.tag_name().name();
        if !KNOWN_SECTIONS.contains(&name) && attr(section, ns, "required").as_deref() == Some("true") {
            return Err(Error::new(format!("the envelope requires section {name}, which this importer does not understand")));
        }
    }
    let mut files = Vec::new();
    if let Some(refs) = child(root, "References") {
        for f in refs.children().filter(|c| c.is_element() && c.tag_name().name() == "File").take(MAX_DISKS + 1) {
            let id = attr(f, ns, "id").ok_or_else(|| Error::new("References/File without ovf:id"))?;
            let href = attr(f, ns, "href").ok_or_else(|| Error::new(format!("file {id} has no ovf:href")))?;
            if attr(f, ns, "compression").is_some_and(|c| c != "identity") {
                return Err(Error::new(format!("file {href} is compressed ({}); unpack the package first", attr(f, ns, "compression").unwrap_or_default())));
            }
            if attr(f, ns, "chunkSize").is_some() {
                return Err(Error::new(format!("file {href} is split into chunks, which this importer does not read")));
            }
            let size = attr(f, ns, "size").map(|s| number(&format!("file {href} size"), &s)).transpose()?;
            files.push(FileRef { id, href, size });
        }
    }
    if files.len() > MAX_DISKS {
        return Err(Error::new(format!("more than {MAX_DISKS} files in References")));
    }
    let mut disk_defs = Vec::new();
    if let Some(section) = child(root, "DiskSection") {
        for d in section.children().filter(|c| c.is_element() && c.tag_name().name() == "Disk").take(MAX_DISKS + 1) {
            let id = attr(d, ns, "diskId").ok_or_else(|| Error::new("Disk without ovf:diskId"))?;
            let capacity = attr(d, ns, "capacity").ok_or_else(|| Error::new(format!("disk {id} has no ovf:capacity")))?;
            let capacity = scaled(&format!("disk {id} capacity"), &capacity, attr(d, ns, "capacityAllocationUnits").as_deref(), 1)?;
            let file = match attr(d, ns, "fileRef") {
                Some(r) => Some(files.iter().find(|f| f.id == r).map(|f| f.href.clone()).ok_or_else(|| Error::new(format!("disk {id} names file {r}, which References lacks")))?),
                None => None,
            };
            if attr(d, ns, "parentRef").is_some() {
                return Err(Error::new(format!("disk {id} is a delta disk (ovf:parentRef), which this importer does not read")));
            }
            disk_defs.push(Disk { id, file, capacity });
        }
    }
    if disk_defs.len() > MAX_DISKS {
        return Err(Error::new(format!("more than {MAX_DISKS} disks")));
    }
    let system = root
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "VirtualSystem")
        .ok_or_else(|| Error::new("the envelope has no VirtualSystem"))?;
    for section in system.children().filter(|c| c.is_element()) {
        let name = section.tag_name().name();
        if !KNOWN_SECTIONS.contains(&name) && attr(section, ns, "required").as_deref() == Some("true") {
            return Err(Error::new(format!("the virtual system requires section {name}, which this importer does not understand")));
        }
    }
    let name = text_of(system, "Name").or_else(|| attr(system, ns, "id")).unwrap_or_default();
    let hardware = child(system, "VirtualHardwareSection").ok_or_else(|| Error::new("the virtual system has no VirtualHardwareSection"))?;
    let (mut vcpus, mut memory) = (None, None);
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    let items: Vec<_> = hardware
        .children()
        .filter(|c| c.is_element() && matches!(c.tag_name().name(), "Item" | "StorageItem" | "EthernetPortItem"))
        .collect();
    if items.len() > MAX_ITEMS {
        return Err(Error::new(format!("more than {MAX_ITEMS} hardware items")));
    }
    for item in items {
        let field = |name: &str| text_of(item, name);
        let kind = field("ResourceType").unwrap_or_default();
        match kind.as_str() {
            "3" => {
                let n = number("CPU VirtualQuantity", &field("VirtualQuantity").unwrap_or_default())?;
                vcpus = Some(u32::try_from(n).ok().filter(|&n| (1..=255).contains(&n)).ok_or_else(|| Error::new(format!("{n} CPUs (1-255)")))?);
            }
            "4" => {
                let q = field("VirtualQuantity").unwrap_or_default();
                memory = Some(scaled("memory", &q, field("AllocationUnits").as_deref(), 1 << 20)?);
            }
            "17" => {
                let host = field("HostResource").unwrap_or_default();
                let id = host.trim_start_matches("ovf:").trim_start_matches("/disk/").to_string();
                let disk = disk_defs.iter().find(|d| d.id == id).ok_or_else(|| Error::new(format!("disk item names {host:?}, which DiskSection lacks")))?;
                if disks.iter().any(|d: &Disk| d.id == disk.id) {
                    return Err(Error::new(format!("disk {} is attached twice", disk.id)));
                }
                disks.push(disk.clone());
            }
            "10" => {
                if nics.len() >= MAX_NICS {
                    return Err(Error::new(format!("more than {MAX_NICS} NICs")));
                }
                let network = field("Connection").unwrap_or_default();
                nics.push(Nic { network, mac: field("Address").filter(|a| !a.is_empty()) });
            }
            _ => {}
        }
    }
    let memory = memory.ok_or_else(|| Error::new("the hardware has no memory item (ResourceType 4)"))?;
    if !(1 << 20..=1 << 40).contains(&memory) {
        return Err(Error::new(format!("memory of {memory} bytes (1 MiB - 1 TiB)")));
    }
    Ok(Envelope { name, vcpus: vcpus.unwrap_or(1), memory, files, disks, nics })
}

/// Escapes text for XML content and attributes.
fn xml(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// A disk to describe in an exported envelope: its file in the package, the file's size and the
/// virtual disk's capacity.
pub struct ExportDisk {
    pub href: String,
    pub file_size: u64,
    pub capacity: u64,
}

/// Writes an OVF 1.0 envelope (what VirtualBox writes by default and VMware reads): one virtual
/// system with its CPUs and memory, an LSI Logic SCSI controller holding the streamOptimized
/// disks in order, and E1000 NICs on networks of the names given.
pub fn write(name: &str, vcpus: u32, memory: u64, disks: &[ExportDisk], nics: &[Nic]) -> String {
    let mut refs = String::new();
    let mut disk_section = String::new();
    for (i, d) in disks.iter().enumerate() {
        refs += &format!("    <File ovf:id=\"file{}\" ovf:href=\"{}\" ovf:size=\"{}\"/>\n", i + 1, xml(&d.href), d.file_size);
        disk_section += &format!(
            "    <Disk ovf:diskId=\"vmdisk{n}\" ovf:fileRef=\"file{n}\" ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte\" \
             ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n",
            d.capacity,
            n = i + 1
        );
    }
    let mut networks: Vec<&str> = nics.iter().map(|n| n.network.as_str()).collect();
    networks.dedup();
    let network_section: String = networks.iter().map(|n| format!("    <Network ovf:name=\"{}\">\n      <Description>{}</Description>\n    </Network>\n", xml(n), xml(n))).collect();
    let mut items = format!(
        "      <Item>\n        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>\n        <rasd:Description>Number of virtual CPUs</rasd:Description>\n        \
         <rasd:ElementName>{vcpus} virtual CPU(s)</rasd:ElementName>\n        <rasd:InstanceID>1</rasd:InstanceID>\n        <rasd:ResourceType>3</rasd:ResourceType>\n        \
         <rasd:VirtualQuantity>{vcpus}</rasd:VirtualQuantity>\n      </Item>\n      <Item>\n        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>\n        \
         <rasd:Description>Memory Size</rasd:Description>\n        <rasd:ElementName>{mib}MB of memory</rasd:ElementName>\n        <rasd:InstanceID>2</rasd:InstanceID>\n        \
         <rasd:ResourceType>4</rasd:ResourceType>\n        <rasd:VirtualQuantity>{mib}</rasd:VirtualQuantity>\n      </Item>\n      <Item>\n        <rasd:Address>0</rasd:Address>\n        \
         <rasd:Description>SCSI Controller</rasd:Description>\n        <rasd:ElementName>SCSI Controller 0</rasd:ElementName>\n        <rasd:InstanceID>3</rasd:InstanceID>\n        \
         <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>\n        <rasd:ResourceType>6</rasd:ResourceType>\n      </Item>\n",
        mib = memory.div_ceil(1 << 20)
    );
    let mut id = 4;
    for (i, _) in disks.iter().enumerate() {
        items += &format!(
            "      <Item>\n        <rasd:AddressOnParent>{i}</rasd:AddressOnParent>\n        <rasd:ElementName>Hard Disk {n}</rasd:ElementName>\n        \
             <rasd:HostResource>ovf:/disk/vmdisk{n}</rasd:HostResource>\n        <rasd:InstanceID>{id}</rasd:InstanceID>\n        <rasd:Parent>3</rasd:Parent>\n        \
             <rasd:ResourceType>17</rasd:ResourceType>\n      </Item>\n",
            n = i + 1
        );
        id += 1;
    }
    for (i, nic) in nics.iter().enumerate() {
        let mac = nic.mac.as_ref().map(|m| format!("        <rasd:Address>{}</rasd:Address>\n", xml(m))).unwrap_or_default();
        items += &format!(
            "      <Item>\n{mac}        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>\n        <rasd:Connection>{}</rasd:Connection>\n        \
             <rasd:ElementName>Network adapter {}</rasd:ElementName>\n        <rasd:InstanceID>{id}</rasd:InstanceID>\n        \
             <rasd:ResourceSubType>E1000</rasd:ResourceSubType>\n        <rasd:ResourceType>10</rasd:ResourceType>\n      </Item>\n",
            xml(&nic.network),
            i + 1
        );
        id += 1;
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Envelope xmlns=\"{OVF1}\" xmlns:ovf=\"{OVF1}\" \
         xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\" \
         xmlns:vssd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\n  <References>\n{refs}  </References>\n  <DiskSection>\n    \
         <Info>Virtual disk information</Info>\n{disk_section}  </DiskSection>\n  <NetworkSection>\n    <Info>The list of logical networks</Info>\n{network_section}  \
         </NetworkSection>\n  <VirtualSystem ovf:id=\"{name}\">\n    <Info>A virtual machine exported by Ferrovisor</Info>\n    <Name>{name}</Name>\n    \
         <OperatingSystemSection ovf:id=\"101\">\n      <Info>The kind of installed guest operating system</Info>\n      <Description>Linux 2.6.x 64-bit</Description>\n    \
         </OperatingSystemSection>\n    <VirtualHardwareSection>\n      <Info>Virtual hardware requirements</Info>\n      <System>\n        \
         <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n        <vssd:InstanceID>0</vssd:InstanceID>\n        \
         <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>\n        <vssd:VirtualSystemType>vmx-10</vssd:VirtualSystemType>\n      </System>\n\
         {items}    </VirtualHardwareSection>\n  </VirtualSystem>\n</Envelope>\n",
        name = xml(name)
    )
}

/// One line of a manifest: the digest algorithm, the file and its digest (lower-case hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub algorithm: Algorithm,
    pub file: String,
    pub hex: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha1,
    Sha256,
}

/// Reads a manifest (`SHA256(disk1.vmdk)= 0123...`), refusing lines it cannot use.
pub fn parse_manifest(text: &str) -> Result<Vec<Digest>, Error> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let bad = || Error::new(format!("manifest line {line:?} is not ALGORITHM(file)= digest"));
        let (algo, rest) = line.split_once('(').ok_or_else(bad)?;
        let (file, digest) = rest.rsplit_once(")=").ok_or_else(bad)?;
        let (algorithm, len) = match algo.trim() {
            "SHA1" => (Algorithm::Sha1, 40),
            "SHA256" => (Algorithm::Sha256, 64),
            other => return Err(Error::new(format!("manifest uses digest {other}; SHA1 and SHA256 are checked"))),
        };
        let hex = digest.trim().to_ascii_lowercase();
        if hex.len() != len || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        out.push(Digest { algorithm, file: file.to_string(), hex });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_manifests() {
        assert_eq!(units("byte * 2^30"), Some(1 << 30));
        assert_eq!(units("byte*2^20"), Some(1 << 20));
        assert_eq!(units("MegaBytes"), Some(1 << 20));
        assert_eq!(units("byte * 10^3"), Some(1000));
        assert_eq!(units("byte * 2^99"), None);
        assert_eq!(units("furlongs"), None);
        let m = parse_manifest("SHA256(a.ovf)= 00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF\nSHA1(b.vmdk)=0011223344556677889900112233445566778899\n").unwrap();
        assert_eq!(m[0].file, "a.ovf");
        assert_eq!(m[1].algorithm, Algorithm::Sha1);
        assert!(parse_manifest("MD5(a)= 00").is_err());
        assert!(parse_manifest("SHA1(a)= 00").is_err());
    }

    #[test]
    fn our_envelope_reads_back() {
        let disks = [ExportDisk { href: "web-disk1.vmdk".into(), file_size: 1234, capacity: 10 << 30 }];
        let nics = [Nic { network: "tap-web".into(), mac: Some("52:54:00:12:34:56".into()) }];
        let text = write("web <1>", 2, 1536 << 20, &disks, &nics);
        let e = parse(&text).unwrap();
        assert_eq!((e.name.as_str(), e.vcpus, e.memory), ("web <1>", 2, 1536 << 20));
        assert_eq!(e.disks, [Disk { id: "vmdisk1".into(), file: Some("web-disk1.vmdk".into()), capacity: 10 << 30 }]);
        assert_eq!(e.files[0].size, Some(1234));
        assert_eq!(e.nics, nics);
    }

    #[test]
    fn hostile_descriptors_are_refused() {
        let good = write("a", 1, 1 << 30, &[], &[]);
        let cases = [
            (good.replace("<rasd:VirtualQuantity>1024", "<rasd:VirtualQuantity>99999999999999999999"), "not a number"),
            (good.replace("<rasd:VirtualQuantity>1</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>0</rasd:VirtualQuantity>"), "0 CPUs"),
            (good.replace("byte * 2^20", "byte * 2^60"), "overflows"),
            (good.replace("<NetworkSection>", "<FutureSection ovf:required=\"true\"/><NetworkSection>"), "requires section FutureSection"),
            (good.replace("Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\"", "Envelope xmlns=\"urn:other\""), "not an OVF envelope"),
            ("<!DOCTYPE x [<!ENTITY a \"aaaa\">]><Envelope/>".to_string(), "not XML"),
            (format!("{good}{}", " ".repeat(MAX_DESCRIPTOR)), "at most"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
