//! Frame classification: what a frame is and which 5-tuple it carries, read in place from the
//! frame's bytes (no copy, no allocation). Malformed or truncated frames give a
//! [`DropReason`], never a panic.

use crate::counters::DropReason;
use crate::key::{proto, FlowKey, Ip};

/// What kind of frame this is; decides how the switch treats it (see SEMANTICS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// ARP: copied to every other endpoint of the NIC.
    Arp,
    /// EAPOL (802.1X, WiFi authentication): copied to every other endpoint of the NIC.
    Eapol,
    /// ICMPv6 neighbour discovery (router/neighbour solicitation and advertisement, redirect):
    /// IPv6's ARP, copied to every other endpoint of the NIC.
    NeighborDiscovery,
    /// A DHCPv4 request (UDP 68 -> 67).
    DhcpRequest,
    /// A DHCPv4 answer (UDP 67 -> 68).
    DhcpAnswer,
    /// An IPv4 or IPv6 packet matched on its 5-tuple (ports are 0 for portless protocols).
    L4,
    /// A non-first IPv4/IPv6 fragment: no L4 header, follows its first fragment's decision.
    Fragment,
}

/// Fragmentation details of an IPv4 or IPv6 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragInfo {
    /// The IP identification (16 bits for IPv4, 32 for IPv6).
    pub id: u32,
    /// Offset 0: the fragment that carries the L4 header.
    pub first: bool,
    /// More fragments follow.
    pub more: bool,
}

/// A classified frame: the fields the switch decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What kind of frame this is.
    pub kind: FrameKind,
    /// Destination MAC address.
    pub dst_mac: [u8; 6],
    /// Source MAC address.
    pub src_mac: [u8; 6],
    /// The 802.1Q VLAN id, if the frame is tagged.
    pub vlan: Option<u16>,
    /// Source IP (unspecified for ARP/EAPOL).
    pub src_ip: Ip,
    /// Destination IP (unspecified for ARP/EAPOL).
    pub dst_ip: Ip,
    /// Source port (0 without ports).
    pub src_port: u16,
    /// Destination port (0 without ports).
    pub dst_port: u16,
    /// IP protocol number of the L4 payload (0 for ARP/EAPOL).
    pub proto: u8,
    /// Set for fragments (first or later).
    pub frag: Option<FragInfo>,
}

impl Frame {
    /// The key of a frame arriving from the NIC: the local side is the destination.
    #[inline]
    pub fn incoming_key(&self) -> FlowKey {
        FlowKey {
            local_ip: self.dst_ip,
            remote_ip: self.src_ip,
            local_port: self.dst_port,
            remote_port: self.src_port,
            proto: self.proto,
        }
    }

    /// The key of a frame an endpoint sends: the local side is the source.
    #[inline]
    pub fn outgoing_key(&self) -> FlowKey {
        FlowKey {
            local_ip: self.src_ip,
            remote_ip: self.dst_ip,
            local_port: self.src_port,
            remote_port: self.dst_port,
            proto: self.proto,
        }
    }
}

const ETH_HDR: usize = 14;

/// Classifies one Ethernet frame.
///
/// PLACEHOLDER (to be completed): handles untagged IPv4 TCP/UDP only.
pub fn classify(frame: &[u8]) -> Result<Frame, DropReason> {
    if frame.len() < ETH_HDR {
        return Err(DropReason::Truncated);
    }
    let mut f = Frame {
        kind: FrameKind::L4,
        dst_mac: frame[0..6].try_into().map_err(|_| DropReason::Truncated)?,
        src_mac: frame[6..12].try_into().map_err(|_| DropReason::Truncated)?,
        vlan: None,
        src_ip: Ip::UNSPECIFIED,
        dst_ip: Ip::UNSPECIFIED,
        src_port: 0,
        dst_port: 0,
        proto: 0,
        frag: None,
    };
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype != 0x0800 {
        return Err(DropReason::Unsupported);
    }
    let ip = &frame[ETH_HDR..];
    if ip.len() < 20 {
        return Err(DropReason::Truncated);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(DropReason::Malformed);
    }
    f.proto = ip[9];
    f.src_ip = Ip::v4([ip[12], ip[13], ip[14], ip[15]]);
    f.dst_ip = Ip::v4([ip[16], ip[17], ip[18], ip[19]]);
    if proto::has_ports(f.proto) {
        let l4 = ip.get(ihl..ihl + 4).ok_or(DropReason::Truncated)?;
        f.src_port = u16::from_be_bytes([l4[0], l4[1]]);
        f.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
    }
    Ok(f)
}
