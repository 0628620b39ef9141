//! Flow and rule keys: the 5-tuple a frame is matched on.
//!
//! A [`FlowKey`] is always seen from the switch's *local* side: for a frame that arrives from
//! the NIC the local address is the destination, for a frame an endpoint sends it is the
//! source. Rules use the same type, with wildcards: a listening rule has
//! [`Ip::UNSPECIFIED`] as remote address and `0` as remote port; a rule without a local port
//! (ICMP) has `0` as local port. Ports are `0` for protocols that carry none.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers the switch knows ports for (RFC 1700 / IANA).
pub mod proto {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// DCCP.
    pub const DCCP: u8 = 33;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// UDP-Lite.
    pub const UDPLITE: u8 = 136;

    /// Whether frames of this protocol carry 16-bit source and destination ports in the first
    /// four bytes of their L4 header.
    #[inline]
    pub const fn has_ports(p: u8) -> bool {
        matches!(p, TCP | UDP | DCCP | SCTP | UDPLITE)
    }
}

/// An IPv4 or IPv6 address in 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one
/// key type serves both families and compares with plain byte equality.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Ip(pub [u8; 16]);

impl Ip {
    /// The "any" address used as wildcard in rules (`::`).
    pub const UNSPECIFIED: Ip = Ip([0; 16]);

    /// An IPv4 address from its four network-order bytes.
    #[inline]
    pub const fn v4(o: [u8; 4]) -> Ip {
        Ip([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
        ])
    }

    /// An IPv6 address from its sixteen network-order bytes.
    #[inline]
    pub const fn v6(o: [u8; 16]) -> Ip {
        Ip(o)
    }

    /// Whether this is an IPv4(-mapped) address.
    #[inline]
    pub fn is_v4(&self) -> bool {
        self.0[..10] == [0; 10] && self.0[10] == 0xff && self.0[11] == 0xff
    }

    /// Whether this is the wildcard `::`.
    #[inline]
    pub fn is_unspecified(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Whether this is a loopback address (127.0.0.0/8 or ::1).
    #[inline]
    pub fn is_loopback(&self) -> bool {
        if self.is_v4() {
            self.0[12] == 127
        } else {
            self.0 == Ipv6Addr::LOCALHOST.octets()
        }
    }

    /// Converts to the standard library's address type.
    pub fn to_std(self) -> IpAddr {
        if self.is_v4() {
            IpAddr::V4(Ipv4Addr::new(
                self.0[12], self.0[13], self.0[14], self.0[15],
            ))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.0))
        }
    }
}

impl From<IpAddr> for Ip {
    fn from(a: IpAddr) -> Ip {
        match a {
            IpAddr::V4(v4) => Ip::v4(v4.octets()),
            IpAddr::V6(v6) => Ip::v6(v6.octets()),
        }
    }
}

impl From<Ipv4Addr> for Ip {
    fn from(a: Ipv4Addr) -> Ip {
        Ip::v4(a.octets())
    }
}

impl From<Ipv6Addr> for Ip {
    fn from(a: Ipv6Addr) -> Ip {
        Ip::v6(a.octets())
    }
}

impl fmt::Debug for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_std())
    }
}

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_std())
    }
}

/// A 5-tuple seen from the local side. Used for frames (all fields from the headers) and for
/// rules (with wildcards, see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FlowKey {
    /// The local IP address (destination of incoming frames).
    pub local_ip: Ip,
    /// The remote IP address, or [`Ip::UNSPECIFIED`] in a listening rule.
    pub remote_ip: Ip,
    /// The local port, or 0 for portless protocols and protocol-wide rules.
    pub local_port: u16,
    /// The remote port, or 0 in a listening rule or a remote-address-only rule.
    pub remote_port: u16,
    /// The IP protocol number.
    pub proto: u8,
}

impl FlowKey {
    /// The listening-rule key for this flow: same local side, remote side empty.
    #[inline]
    pub fn listening(&self) -> FlowKey {
        FlowKey {
            remote_ip: Ip::UNSPECIFIED,
            remote_port: 0,
            ..*self
        }
    }

    /// The key with the remote port emptied but the remote address kept (rules such as
    /// `DEBUG_PORTS=eth0:TCP:22:192.0.2.1`).
    #[inline]
    pub fn remote_ip_only(&self) -> FlowKey {
        FlowKey {
            remote_port: 0,
            ..*self
        }
    }

    /// Whether this key, used as a rule, is a listening rule (no remote address).
    #[inline]
    pub fn is_listening(&self) -> bool {
        self.remote_ip.is_unspecified() && self.remote_port == 0
    }
}

impl fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}<-{}:{}/{}",
            self.local_ip, self.local_port, self.remote_ip, self.remote_port, self.proto
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapping_round_trips() {
        let ip = Ip::v4([10, 0, 0, 2]);
        assert!(ip.is_v4());
        assert_eq!(ip.to_std(), "10.0.0.2".parse::<IpAddr>().unwrap());
        assert!(Ip::v4([127, 1, 2, 3]).is_loopback());
        assert!(Ip::from("::1".parse::<IpAddr>().unwrap()).is_loopback());
        assert!(!Ip::from("fe80::1".parse::<IpAddr>().unwrap()).is_v4());
    }

    #[test]
    fn listening_key_drops_remote_side() {
        let k = FlowKey {
            local_ip: Ip::v4([10, 0, 0, 2]),
            remote_ip: Ip::v4([10, 0, 0, 1]),
            local_port: 80,
            remote_port: 5555,
            proto: proto::TCP,
        };
        assert!(k.listening().is_listening());
        assert!(!k.remote_ip_only().is_listening());
        assert_eq!(k.listening().local_port, 80);
    }
}
