//! Links, addresses and routes over rtnetlink: the messages `ip link`, `ip addr` and `ip route`
//! send, built with netlink-packet-route and exchanged on a blocking netlink socket.
//!
//! A [`Netlink`] socket belongs to the network namespace of the thread that opened it.

use ferro_vmm_api::MacAddr;
use ipnet::Ipv4Net;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::io;
use std::net::IpAddr;

/// One network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The link kind (`bridge`, `tun`, `veth`, ...); None for physical devices and loopback.
    pub kind: Option<String>,
    /// The index of the bridge this link is a port of.
    pub controller: Option<u32>,
    pub up: bool,
    pub mac: Option<MacAddr>,
}

/// A route of the main table towards a subnet (default routes are left out).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub destination: Ipv4Net,
    /// The interface the route goes out of, when it has one.
    pub device: Option<String>,
}

/// A netlink route socket, with the sequence numbers of its requests.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends one request and collects the messages of its answer, until the ACK or the end of
    /// the dump. A NACK becomes the matching `io::Error`.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut answers = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {e}")))?;
                let length = reply.header.length as usize;
                if length == 0 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "netlink reply of length 0"));
                }
                offset += length;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => match e.code {
                        Some(code) => return Err(io::Error::from_raw_os_error(-code.get())),
                        None => return Ok(answers),
                    },
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(m) => {
                        answers.push(m);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(answers);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.request(message, NLM_F_ACK | flags).map(drop)
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let answers = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        Ok(answers.into_iter().filter_map(|m| if let RouteNetlinkMessage::NewLink(l) = m { Some(link_of(l)) } else { None }).collect())
    }

    /// The link called `name`, or None.
    pub fn link(&mut self, name: &str) -> io::Result<Option<Link>> {
        let mut query = LinkMessage::default();
        query.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::GetLink(query), 0) {
            Ok(answers) => Ok(answers.into_iter().find_map(|m| if let RouteNetlinkMessage::NewLink(l) = m { Some(link_of(l)) } else { None })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a bridge with a fixed MAC (so it does not change as ports come and go), down.
    pub fn add_bridge(&mut self, name: &str, mac: MacAddr) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        m.attributes.push(LinkAttribute::Address(mac.bytes().to_vec()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
        self.ack(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Makes link `index` a port of bridge `bridge` (0: of no bridge).
    pub fn set_controller(&mut self, index: u32, bridge: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Controller(bridge));
        self.ack(RouteNetlinkMessage::SetLink(m), 0)
    }

    /// Brings link `index` up or down.
    pub fn set_up(&mut self, index: u32, up: bool) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = if up { LinkFlags::Up } else { LinkFlags::empty() };
        m.header.change_mask = LinkFlags::Up;
        self.ack(RouteNetlinkMessage::SetLink(m), 0)
    }

    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.ack(RouteNetlinkMessage::DelLink(m), 0)
    }

    /// Adds `address` (host address and prefix) to link `index`, with its broadcast address.
    pub fn add_address(&mut self, index: u32, address: Ipv4Net) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = address.prefix_len();
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(IpAddr::V4(address.addr())));
        m.attributes.push(AddressAttribute::Address(IpAddr::V4(address.addr())));
        m.attributes.push(AddressAttribute::Broadcast(address.broadcast()));
        self.ack(RouteNetlinkMessage::NewAddress(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// The IPv4 addresses of link `index`.
    pub fn addresses(&mut self, index: u32) -> io::Result<Vec<Ipv4Net>> {
        let mut query = AddressMessage::default();
        query.header.family = AddressFamily::Inet;
        let answers = self.request(RouteNetlinkMessage::GetAddress(query), NLM_F_DUMP)?;
        let mut found = Vec::new();
        for answer in answers {
            let RouteNetlinkMessage::NewAddress(a) = answer else { continue };
            if a.header.index != index {
                continue;
            }
            for attribute in &a.attributes {
                if let AddressAttribute::Local(IpAddr::V4(addr)) = attribute
                    && let Ok(net) = Ipv4Net::new(*addr, a.header.prefix_len)
                {
                    found.push(net);
                }
            }
        }
        Ok(found)
    }

    /// The unicast routes of the main table towards a subnet (not the default route).
    pub fn routes(&mut self) -> io::Result<Vec<Route>> {
        let mut query = RouteMessage::default();
        query.header.address_family = AddressFamily::Inet;
        let answers = self.request(RouteNetlinkMessage::GetRoute(query), NLM_F_DUMP)?;
        let links = self.links()?;
        let mut routes = Vec::new();
        for answer in answers {
            let RouteNetlinkMessage::NewRoute(r) = answer else { continue };
            let table = r.attributes.iter().find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None });
            let table = table.unwrap_or(u32::from(r.header.table));
            if table != u32::from(RouteHeader::RT_TABLE_MAIN) || r.header.kind != RouteType::Unicast || r.header.destination_prefix_length == 0 {
                continue;
            }
            let destination = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                _ => None,
            });
            let oif = r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
            let Some(destination) = destination else { continue };
            let Ok(destination) = Ipv4Net::new(destination, r.header.destination_prefix_length) else { continue };
            let device = oif.and_then(|i| links.iter().find(|l| l.index == i)).map(|l| l.name.clone());
            routes.push(Route { destination, device });
        }
        Ok(routes)
    }
}

fn link_of(m: LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        kind: None,
        controller: None,
        up: m.header.flags.contains(LinkFlags::Up),
        mac: None,
    };
    for attribute in m.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Controller(c) if c != 0 => link.controller = Some(c),
            LinkAttribute::Address(bytes) => link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// Whether this kernel can make bridges: built in or loaded (`/sys/module/bridge`), or a module
/// the kernel can load on first use.
pub fn bridge_support() -> Result<String, String> {
    if std::path::Path::new("/sys/module/bridge").exists() {
        return Ok("bridge module present".into());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let module = format!("/lib/modules/{}/kernel/net/bridge", release.trim());
    if std::path::Path::new(&module).exists() {
        return Ok(format!("loadable from {module}"));
    }
    Err("the kernel has no bridge support (CONFIG_BRIDGE): nat and isolated networks cannot be created".into())
}
