//! A frame builder for the classifier tests, and the reference model: [`Spec::expected`]
//! computes what `classify` must answer for a [`Spec`] from the spec alone, independently of
//! the classifier's code.
#![allow(dead_code)]

use usnetd_shards::frame::{FragInfo, Frame, FrameKind};
use usnetd_shards::key::Ip;

/// Protocol numbers (written out here on purpose: the model does not reuse the crate's).
pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const DCCP: u8 = 33;
pub const ICMPV6: u8 = 58;
pub const SCTP: u8 = 132;
pub const UDPLITE: u8 = 136;
pub const GRE: u8 = 47;

pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// An IPv6 extension header (before the upper layer header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options, `(len + 1) * 8` bytes.
    HopByHop(u8),
    /// Routing header, `(len + 1) * 8` bytes.
    Routing(u8),
    /// Destination options, `(len + 1) * 8` bytes.
    DestOpts(u8),
    /// Authentication header, `(len + 2) * 4` bytes.
    Ah(u8),
    /// Fragment header: offset in 8-byte units, more fragments, id.
    Fragment { offset: u16, more: bool, id: u32 },
}

impl Ext {
    pub fn number(self) -> u8 {
        match self {
            Ext::HopByHop(_) => 0,
            Ext::Routing(_) => 43,
            Ext::DestOpts(_) => 60,
            Ext::Ah(_) => 51,
            Ext::Fragment { .. } => 44,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop(len) | Ext::Routing(len) | Ext::DestOpts(len) => {
                let mut b = vec![0u8; (usize::from(len) + 1) * 8];
                b[0] = next;
                b[1] = len;
                b
            }
            Ext::Ah(len) => {
                let mut b = vec![0u8; (usize::from(len) + 2) * 4];
                b[0] = next;
                b[1] = len;
                b
            }
            Ext::Fragment { offset, more, id } => {
                let mut b = vec![next, 0];
                b.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                b.extend_from_slice(&id.to_be_bytes());
                b
            }
        }
    }
}

/// The IP layer of a frame.
#[derive(Clone, Debug)]
pub enum Net {
    /// ARP request for 10.0.0.2.
    Arp,
    /// EAPOL-Start with a `body` byte body.
    Eapol { body: u16 },
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        id: u16,
        /// Fragment offset in 8-byte units.
        offset: u16,
        more: bool,
        dont_fragment: bool,
        /// IPv4 option words (IHL = 5 + options).
        options: u8,
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        exts: Vec<Ext>,
    },
}

/// Everything a test frame is built from.
#[derive(Clone, Debug)]
pub struct Spec {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// VLAN tags, outermost first: (TPID, VLAN id).
    pub tags: Vec<(u16, u16)>,
    pub net: Net,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// ICMP/ICMPv6 type.
    pub icmp_type: u8,
    /// L4 payload bytes after the L4 header.
    pub payload: usize,
    /// Ethernet padding after the IP packet.
    pub padding: usize,
}

impl Spec {
    pub fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, src_port: u16, dst_port: u16) -> Spec {
        Spec {
            dst_mac: DST_MAC,
            src_mac: SRC_MAC,
            tags: Vec::new(),
            net: Net::V4 {
                src,
                dst,
                id: 0x1234,
                offset: 0,
                more: false,
                dont_fragment: true,
                options: 0,
            },
            proto,
            src_port,
            dst_port,
            icmp_type: 8,
            payload: 10,
            padding: 0,
        }
    }

    pub fn v6(src: [u8; 16], dst: [u8; 16], proto: u8, src_port: u16, dst_port: u16) -> Spec {
        Spec {
            net: Net::V6 {
                src,
                dst,
                exts: Vec::new(),
            },
            icmp_type: 128,
            ..Spec::v4([0; 4], [0; 4], proto, src_port, dst_port)
        }
    }

    pub fn arp() -> Spec {
        Spec {
            dst_mac: [0xff; 6],
            net: Net::Arp,
            proto: 0,
            ..Spec::v4([0; 4], [0; 4], 0, 0, 0)
        }
    }

    pub fn eapol(body: u16) -> Spec {
        Spec {
            net: Net::Eapol { body },
            proto: 0,
            ..Spec::v4([0; 4], [0; 4], 0, 0, 0)
        }
    }

    pub fn tagged(mut self, tags: &[(u16, u16)]) -> Spec {
        self.tags = tags.to_vec();
        self
    }

    pub fn v4_fragment(mut self, new_id: u16, new_offset: u16, new_more: bool) -> Spec {
        if let Net::V4 {
            id,
            offset,
            more,
            dont_fragment,
            ..
        } = &mut self.net
        {
            *id = new_id;
            *offset = new_offset;
            *more = new_more;
            *dont_fragment = false;
        }
        self
    }

    pub fn v6_exts(mut self, new_exts: &[Ext]) -> Spec {
        if let Net::V6 { exts, .. } = &mut self.net {
            *exts = new_exts.to_vec();
        }
        self
    }

    fn has_ports(&self) -> bool {
        [TCP, UDP, DCCP, SCTP, UDPLITE].contains(&self.proto)
    }

    /// The L4 header and payload.
    pub fn l4_bytes(&self) -> Vec<u8> {
        let header = match self.proto {
            TCP => 20,
            UDP | UDPLITE => 8,
            DCCP | SCTP => 12,
            ICMP | ICMPV6 => 8,
            _ => 0,
        };
        let mut b = vec![0xa5u8; header + self.payload];
        if self.has_ports() {
            b[..2].copy_from_slice(&self.src_port.to_be_bytes());
            b[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        } else if self.proto == ICMP || self.proto == ICMPV6 {
            b[0] = self.icmp_type;
            b[1] = 0;
        }
        b
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        for &(tpid, vid) in &self.tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            // Priority 5 and DEI set: the classifier must mask them off.
            f.extend_from_slice(&((5 << 13) | (1 << 12) | vid).to_be_bytes());
        }
        match &self.net {
            Net::Arp => {
                f.extend_from_slice(&0x0806u16.to_be_bytes());
                f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
                f.extend_from_slice(&self.src_mac);
                f.extend_from_slice(&[10, 0, 0, 1]);
                f.extend_from_slice(&[0; 6]);
                f.extend_from_slice(&[10, 0, 0, 2]);
            }
            Net::Eapol { body } => {
                f.extend_from_slice(&0x888eu16.to_be_bytes());
                f.extend_from_slice(&[2, 1]);
                f.extend_from_slice(&body.to_be_bytes());
                f.extend(std::iter::repeat_n(0x42, usize::from(*body)));
            }
            Net::V4 {
                src,
                dst,
                id,
                offset,
                more,
                dont_fragment,
                options,
            } => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let l4 = self.l4_bytes();
                let ihl = 5 + usize::from(*options);
                let total = ihl * 4 + l4.len();
                f.push(0x40 | ihl as u8);
                f.push(0);
                f.extend_from_slice(&(total as u16).to_be_bytes());
                f.extend_from_slice(&id.to_be_bytes());
                let flags = (u16::from(*dont_fragment) << 14) | (u16::from(*more) << 13);
                f.extend_from_slice(&(flags | offset).to_be_bytes());
                f.extend_from_slice(&[64, self.proto, 0, 0]);
                f.extend_from_slice(src);
                f.extend_from_slice(dst);
                // NOP options.
                f.extend(std::iter::repeat_n(1u8, usize::from(*options) * 4));
                f.extend_from_slice(&l4);
            }
            Net::V6 { src, dst, exts } => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut payload = Vec::new();
                for (i, ext) in exts.iter().enumerate() {
                    let next = exts.get(i + 1).map_or(self.proto, |e| e.number());
                    payload.extend_from_slice(&ext.bytes(next));
                }
                payload.extend_from_slice(&self.l4_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                f.push(exts.first().map_or(self.proto, |e| e.number()));
                f.push(64);
                f.extend_from_slice(src);
                f.extend_from_slice(dst);
                f.extend_from_slice(&payload);
            }
        }
        f.extend(std::iter::repeat_n(0u8, self.padding));
        f
    }

    /// What `classify(&self.build())` must return (the reference model).
    pub fn expected(&self) -> Frame {
        let mut f = Frame {
            kind: FrameKind::L4,
            dst_mac: self.dst_mac,
            src_mac: self.src_mac,
            vlan: self.tags.first().map(|t| t.1),
            inner_vlan: self.tags.get(1).map(|t| t.1),
            l3_offset: 14 + 4 * self.tags.len() as u16,
            src_ip: Ip::UNSPECIFIED,
            dst_ip: Ip::UNSPECIFIED,
            src_port: 0,
            dst_port: 0,
            proto: self.proto,
            frag: None,
        };
        let mut non_first = false;
        match &self.net {
            Net::Arp => {
                f.kind = FrameKind::Arp;
                f.proto = 0;
                return f;
            }
            Net::Eapol { .. } => {
                f.kind = FrameKind::Eapol;
                f.proto = 0;
                return f;
            }
            Net::V4 {
                src,
                dst,
                id,
                offset,
                more,
                ..
            } => {
                f.src_ip = Ip::v4(*src);
                f.dst_ip = Ip::v4(*dst);
                if *offset != 0 || *more {
                    f.frag = Some(FragInfo {
                        id: u32::from(*id),
                        first: *offset == 0,
                        more: *more,
                    });
                }
                non_first = *offset != 0;
            }
            Net::V6 { src, dst, exts } => {
                f.src_ip = Ip::v6(*src);
                f.dst_ip = Ip::v6(*dst);
                for (i, ext) in exts.iter().enumerate() {
                    if let Ext::Fragment { offset, more, id } = *ext {
                        if offset != 0 || more {
                            f.frag = Some(FragInfo {
                                id,
                                first: offset == 0,
                                more,
                            });
                        }
                        if offset != 0 {
                            non_first = true;
                            f.proto = exts.get(i + 1).map_or(self.proto, |e| e.number());
                        }
                    }
                }
            }
        }
        if non_first {
            f.kind = FrameKind::Fragment;
            return f;
        }
        if self.has_ports() {
            f.src_port = self.src_port;
            f.dst_port = self.dst_port;
        }
        let v4 = matches!(self.net, Net::V4 { .. });
        f.kind = match (self.proto, self.src_port, self.dst_port, self.icmp_type) {
            (UDP, 68, 67, _) if v4 => FrameKind::DhcpRequest,
            (UDP, 67, 68, _) if v4 => FrameKind::DhcpAnswer,
            (ICMPV6, _, _, 133..=137) if !v4 => FrameKind::NeighborDiscovery,
            _ => FrameKind::L4,
        };
        f
    }
}

/// 2001:db8::`last`.
pub fn v6addr(last: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0x20;
    a[1] = 0x01;
    a[2] = 0x0d;
    a[3] = 0xb8;
    a[15] = last;
    a
}
