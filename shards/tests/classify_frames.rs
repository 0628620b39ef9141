//! Hand-built frames of every kind the classifier knows, their truncated prefixes, and the
//! frames it must refuse.

mod classify_util;

use classify_util::*;
use usnetd_shards::counters::DropReason;
use usnetd_shards::frame::{classify, FragInfo, FrameKind};
use usnetd_shards::key::Ip;

const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [10, 0, 0, 2];

/// Classifies the spec's frame, checks it against the model, and checks that every proper
/// prefix of it is `Truncated`.
fn check(spec: &Spec) -> usnetd_shards::frame::Frame {
    let bytes = spec.build();
    let got = classify(&bytes);
    assert_eq!(got, Ok(spec.expected()), "{spec:?}");
    if spec.padding == 0 {
        for len in 0..bytes.len() {
            assert_eq!(
                classify(&bytes[..len]),
                Err(DropReason::Truncated),
                "prefix {len} of {spec:?}"
            );
        }
    }
    got.unwrap()
}

fn examples() -> Vec<Spec> {
    let mut v = vec![
        Spec::arp(),
        Spec::eapol(0),
        Spec::eapol(5),
        Spec::v4(A, B, TCP, 40000, 80),
        Spec::v4(A, B, UDP, 5353, 53),
        Spec::v4(A, B, DCCP, 1, 2),
        Spec::v4(A, B, SCTP, 3868, 3868),
        Spec::v4(A, B, UDPLITE, 9, 10),
        Spec::v4(A, B, ICMP, 0, 0),
        Spec::v4(A, B, GRE, 0, 0),
        Spec::v4([0, 0, 0, 0], [255; 4], UDP, 68, 67),
        Spec::v4(B, A, UDP, 67, 68),
        Spec::v6(v6addr(1), v6addr(2), TCP, 40000, 443),
        Spec::v6(v6addr(1), v6addr(2), UDP, 1000, 2000),
        Spec::v6(v6addr(1), v6addr(2), ICMPV6, 0, 0),
        Spec::v6(v6addr(1), v6addr(2), 59, 0, 0),
    ];
    for ty in 130..=140 {
        let mut s = Spec::v6(v6addr(1), v6addr(2), ICMPV6, 0, 0);
        s.icmp_type = ty;
        v.push(s);
    }
    v
}

#[test]
fn every_kind_classifies_and_every_prefix_is_truncated() {
    for spec in examples() {
        check(&spec);
        for tags in [
            &[(0x8100, 7)][..],
            &[(0x88a8, 100), (0x8100, 4094)],
            &[(0x9100, 1), (0x8100, 2)],
        ] {
            check(&spec.clone().tagged(tags));
        }
        let mut padded = spec.clone();
        padded.padding = 17;
        check(&padded);
    }
}

#[test]
fn ipv4_fields() {
    let f = check(&Spec::v4(A, B, TCP, 40000, 80));
    assert_eq!(f.kind, FrameKind::L4);
    assert_eq!((f.src_ip, f.dst_ip), (Ip::v4(A), Ip::v4(B)));
    assert_eq!((f.src_port, f.dst_port, f.proto), (40000, 80, TCP));
    assert_eq!((f.vlan, f.frag, f.l3_offset), (None, None, 14));
    assert_eq!(f.incoming_key().local_port, 80);
    assert_eq!(f.outgoing_key().local_port, 40000);
    let f = check(&Spec::v4(A, B, ICMP, 1, 2));
    assert_eq!((f.src_port, f.dst_port, f.proto), (0, 0, ICMP));
}

#[test]
fn ipv4_options_and_padding() {
    for options in 0..=10 {
        let mut s = Spec::v4(A, B, UDP, 1, 2);
        if let Net::V4 { options: o, .. } = &mut s.net {
            *o = options;
        }
        assert_eq!(check(&s).dst_port, 2);
        s.padding = 40;
        assert_eq!(check(&s).dst_port, 2);
    }
}

#[test]
fn dhcp() {
    let f = check(&Spec::v4([0; 4], [255; 4], UDP, 68, 67));
    assert_eq!(f.kind, FrameKind::DhcpRequest);
    assert_eq!((f.src_port, f.dst_port, f.proto), (68, 67, UDP));
    let f = check(&Spec::v4(B, A, UDP, 67, 68));
    assert_eq!(f.kind, FrameKind::DhcpAnswer);
    assert_eq!(f.incoming_key().local_port, 68);
    // Not DHCP: other ports, TCP, IPv6.
    assert_eq!(check(&Spec::v4(A, B, UDP, 68, 68)).kind, FrameKind::L4);
    assert_eq!(check(&Spec::v4(A, B, TCP, 68, 67)).kind, FrameKind::L4);
    let v6 = Spec::v6(v6addr(1), v6addr(2), UDP, 68, 67);
    assert_eq!(check(&v6).kind, FrameKind::L4);
}

#[test]
fn vlan_tags() {
    let f = check(&Spec::v4(A, B, UDP, 1, 2).tagged(&[(0x8100, 42)]));
    assert_eq!((f.vlan, f.inner_vlan, f.l3_offset), (Some(42), None, 18));
    let f = check(&Spec::v4(A, B, UDP, 1, 2).tagged(&[(0x88a8, 3), (0x8100, 42)]));
    assert_eq!((f.vlan, f.inner_vlan, f.l3_offset), (Some(3), Some(42), 22));
    let f = check(&Spec::arp().tagged(&[(0x8100, 0)]));
    assert_eq!((f.kind, f.vlan), (FrameKind::Arp, Some(0)));
    // A third tag is more than the classifier walks.
    let three = Spec::v4(A, B, UDP, 1, 2).tagged(&[(0x88a8, 1), (0x8100, 2), (0x8100, 3)]);
    assert_eq!(classify(&three.build()), Err(DropReason::Unsupported));
}

#[test]
fn ipv4_fragments() {
    let base = Spec::v4(A, B, UDP, 1000, 2000);
    let first = check(&base.clone().v4_fragment(77, 0, true));
    assert_eq!(first.kind, FrameKind::L4);
    assert_eq!((first.src_port, first.dst_port), (1000, 2000));
    let info = |first, more| {
        Some(FragInfo {
            id: 77,
            first,
            more,
        })
    };
    assert_eq!(first.frag, info(true, true));
    let middle = check(&base.clone().v4_fragment(77, 185, true));
    assert_eq!(middle.kind, FrameKind::Fragment);
    assert_eq!(
        (middle.src_port, middle.dst_port, middle.proto),
        (0, 0, UDP)
    );
    assert_eq!(middle.frag, info(false, true));
    let last = check(&base.clone().v4_fragment(77, 370, false));
    assert_eq!(
        (last.kind, last.frag),
        (FrameKind::Fragment, info(false, false))
    );
    // A DHCP first fragment is still DHCP.
    let dhcp = Spec::v4([0; 4], [255; 4], UDP, 68, 67).v4_fragment(1, 0, true);
    assert_eq!(check(&dhcp).kind, FrameKind::DhcpRequest);
    // RFC 1858: a TCP fragment at offset 8 overlaps the TCP header.
    let overlap = Spec::v4(A, B, TCP, 1, 2).v4_fragment(5, 1, true);
    assert_eq!(classify(&overlap.build()), Err(DropReason::Malformed));
    let udp_at_8 = Spec::v4(A, B, UDP, 1, 2).v4_fragment(5, 1, true);
    assert_eq!(check(&udp_at_8).kind, FrameKind::Fragment);
}

#[test]
fn ipv4_first_fragment_too_short_for_l4_header() {
    // A first fragment that ends inside the TCP header (tiny fragment attack).
    let mut s = Spec::v4(A, B, TCP, 1, 2).v4_fragment(9, 0, true);
    s.payload = 0;
    let mut bytes = s.build();
    let l3 = 14;
    bytes.truncate(l3 + 20 + 8);
    bytes[l3 + 2..l3 + 4].copy_from_slice(&28u16.to_be_bytes());
    assert_eq!(classify(&bytes), Err(DropReason::Truncated));
}

#[test]
fn ipv4_malformed_headers() {
    let good = Spec::v4(A, B, UDP, 1, 2).build();
    let l3 = 14;
    let mut bad_version = good.clone();
    bad_version[l3] = 0x65;
    assert_eq!(classify(&bad_version), Err(DropReason::Malformed));
    for ihl in 0..5u8 {
        let mut short_ihl = good.clone();
        short_ihl[l3] = 0x40 | ihl;
        assert_eq!(classify(&short_ihl), Err(DropReason::Malformed));
    }
    let mut total_below_ihl = good.clone();
    total_below_ihl[l3 + 2..l3 + 4].copy_from_slice(&19u16.to_be_bytes());
    assert_eq!(classify(&total_below_ihl), Err(DropReason::Malformed));
    let mut total_too_long = good.clone();
    let total = (good.len() - l3) as u16;
    total_too_long[l3 + 2..l3 + 4].copy_from_slice(&(total + 1).to_be_bytes());
    assert_eq!(classify(&total_too_long), Err(DropReason::Truncated));
    let mut ihl_beyond_total = good.clone();
    ihl_beyond_total[l3] = 0x4f; // 60 bytes of header in a 38-byte packet
    assert_eq!(classify(&ihl_beyond_total), Err(DropReason::Malformed));
}

#[test]
fn loopback_is_dropped() {
    for (src, dst) in [([127, 0, 0, 1], B), (A, [127, 1, 2, 3])] {
        let s = Spec::v4(src, dst, UDP, 1, 2);
        assert_eq!(classify(&s.build()), Err(DropReason::Loopback));
        let frag = s.v4_fragment(1, 100, false);
        assert_eq!(classify(&frag.build()), Err(DropReason::Loopback));
    }
    let mut localhost = [0u8; 16];
    localhost[15] = 1;
    for (src, dst) in [(localhost, v6addr(2)), (v6addr(1), localhost)] {
        let s = Spec::v6(src, dst, TCP, 1, 2);
        assert_eq!(classify(&s.build()), Err(DropReason::Loopback));
    }
}

#[test]
fn ipv6_refuses_v4_mapped_addresses() {
    let mut mapped = [0u8; 16];
    mapped[10] = 0xff;
    mapped[11] = 0xff;
    mapped[12..].copy_from_slice(&B);
    for (src, dst) in [(mapped, v6addr(2)), (v6addr(1), mapped)] {
        let s = Spec::v6(src, dst, TCP, 1, 2);
        assert_eq!(classify(&s.build()), Err(DropReason::Malformed));
    }
}

#[test]
fn ipv6_extension_headers() {
    let base = Spec::v6(v6addr(1), v6addr(2), UDP, 111, 222);
    let chains: [&[Ext]; 6] = [
        &[Ext::HopByHop(0)],
        &[Ext::HopByHop(1), Ext::Routing(2), Ext::DestOpts(0)],
        &[Ext::Ah(4)],
        &[Ext::DestOpts(3), Ext::Ah(1), Ext::DestOpts(0)],
        &[
            Ext::HopByHop(0),
            Ext::DestOpts(0),
            Ext::Routing(0),
            Ext::Fragment {
                offset: 0,
                more: false,
                id: 5,
            },
            Ext::Ah(1),
            Ext::DestOpts(0),
        ],
        &[Ext::Routing(255)],
    ];
    for exts in chains {
        let f = check(&base.clone().v6_exts(exts));
        assert_eq!(
            (f.kind, f.proto, f.src_port, f.dst_port),
            (FrameKind::L4, UDP, 111, 222)
        );
        // An atomic fragment is not fragmented.
        assert_eq!(f.frag, None);
    }
    // Eight extension headers are walked, nine are not.
    let eight = [Ext::DestOpts(0); 8];
    assert_eq!(check(&base.clone().v6_exts(&eight)).dst_port, 222);
    let nine = base.clone().v6_exts(&[Ext::DestOpts(0); 9]);
    assert_eq!(classify(&nine.build()), Err(DropReason::Unsupported));
    // Hop-by-hop only directly after the IPv6 header.
    let late_hbh = base.clone().v6_exts(&[Ext::DestOpts(0), Ext::HopByHop(0)]);
    assert_eq!(classify(&late_hbh.build()), Err(DropReason::Malformed));
    // Two fragment headers.
    let frag = Ext::Fragment {
        offset: 0,
        more: true,
        id: 1,
    };
    let twice = base.clone().v6_exts(&[frag, frag]);
    assert_eq!(classify(&twice.build()), Err(DropReason::Malformed));
    let atomic = Ext::Fragment {
        offset: 0,
        more: false,
        id: 1,
    };
    let atomic_twice = base.clone().v6_exts(&[atomic, Ext::DestOpts(0), atomic]);
    assert_eq!(classify(&atomic_twice.build()), Err(DropReason::Malformed));
    // ESP hides the rest: L4 without ports.
    let mut esp = base.clone();
    esp.proto = 50;
    let f = check(&esp.v6_exts(&[Ext::DestOpts(0)]));
    assert_eq!((f.kind, f.proto, f.src_port), (FrameKind::L4, 50, 0));
}

#[test]
fn ipv6_fragments() {
    let base = Spec::v6(v6addr(1), v6addr(2), TCP, 5000, 22);
    let frag = |offset, more| Ext::Fragment {
        offset,
        more,
        id: 0xdead_beef,
    };
    let info = |first, more| {
        Some(FragInfo {
            id: 0xdead_beef,
            first,
            more,
        })
    };
    let first = check(&base.clone().v6_exts(&[Ext::HopByHop(0), frag(0, true)]));
    assert_eq!(
        (first.kind, first.src_port, first.dst_port),
        (FrameKind::L4, 5000, 22)
    );
    assert_eq!(first.frag, info(true, true));
    let later = check(&base.clone().v6_exts(&[frag(100, true)]));
    assert_eq!(
        (later.kind, later.proto, later.src_port),
        (FrameKind::Fragment, TCP, 0)
    );
    assert_eq!(later.frag, info(false, true));
    let last = check(&base.clone().v6_exts(&[frag(200, false), Ext::DestOpts(0)]));
    assert_eq!((last.kind, last.proto), (FrameKind::Fragment, 60));
    assert_eq!(last.frag, info(false, false));
    // A neighbour solicitation in a first fragment is still neighbour discovery.
    let mut ns = Spec::v6(v6addr(1), v6addr(2), ICMPV6, 0, 0).v6_exts(&[frag(0, true)]);
    ns.icmp_type = 135;
    assert_eq!(check(&ns).kind, FrameKind::NeighborDiscovery);
}

#[test]
fn neighbor_discovery_types() {
    for ty in 0..=255u8 {
        let mut s = Spec::v6(v6addr(1), v6addr(2), ICMPV6, 0, 0);
        s.icmp_type = ty;
        let f = check(&s);
        let nd = (133..=137).contains(&ty);
        assert_eq!(f.kind == FrameKind::NeighborDiscovery, nd, "type {ty}");
        assert_eq!((f.proto, f.src_port, f.dst_port), (ICMPV6, 0, 0));
    }
}

#[test]
fn ipv6_malformed_and_truncated() {
    let good = Spec::v6(v6addr(1), v6addr(2), UDP, 1, 2).build();
    let mut bad_version = good.clone();
    bad_version[14] = 0x40;
    assert_eq!(classify(&bad_version), Err(DropReason::Malformed));
    let mut long_payload = good.clone();
    let payload = (good.len() - 14 - 40) as u16;
    long_payload[18..20].copy_from_slice(&(payload + 1).to_be_bytes());
    assert_eq!(classify(&long_payload), Err(DropReason::Truncated));
    // An extension header longer than the payload.
    let mut ext = Spec::v6(v6addr(1), v6addr(2), 59, 0, 0).v6_exts(&[Ext::DestOpts(0)]);
    ext.payload = 0;
    let mut bytes = ext.build();
    bytes[14 + 40 + 1] = 1; // 16 bytes announced, 8 present
    assert_eq!(classify(&bytes), Err(DropReason::Truncated));
}

#[test]
fn unsupported_ethertypes() {
    for ethertype in [
        0x0000u16, 0x05dc, 0x0842, 0x8035, 0x8847, 0x88cc, 0x88f7, 0xffff,
    ] {
        let mut f = Spec::v4(A, B, UDP, 1, 2).build();
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        assert_eq!(
            classify(&f),
            Err(DropReason::Unsupported),
            "{ethertype:#06x}"
        );
        let mut tagged = Spec::v4(A, B, UDP, 1, 2).tagged(&[(0x8100, 9)]).build();
        tagged[16..18].copy_from_slice(&ethertype.to_be_bytes());
        assert_eq!(classify(&tagged), Err(DropReason::Unsupported));
    }
}

#[test]
fn arp_and_eapol_lengths() {
    let f = check(&Spec::arp());
    assert_eq!(
        (f.kind, f.proto, f.src_ip),
        (FrameKind::Arp, 0, Ip::UNSPECIFIED)
    );
    assert!(f.is_broadcast());
    // ARP with other address sizes: the announced sizes decide.
    let mut arp = Spec::arp().build();
    arp[18] = 16; // hlen 16: 2 * (16 + 4) bytes of addresses, only 20 present
    assert_eq!(classify(&arp), Err(DropReason::Truncated));
    let f = check(&Spec::eapol(90));
    assert_eq!(f.kind, FrameKind::Eapol);
    let mut short = Spec::eapol(4).build();
    short.pop();
    assert_eq!(classify(&short), Err(DropReason::Truncated));
}

#[test]
fn l4_headers_must_be_complete() {
    // Consistent IP lengths, but the L4 header is cut short.
    for (proto, min) in [
        (TCP, 20),
        (UDP, 8),
        (UDPLITE, 8),
        (DCCP, 12),
        (SCTP, 12),
        (ICMP, 4),
    ] {
        let mut s = Spec::v4(A, B, proto, 1, 2);
        s.payload = 0;
        let full = s.build();
        for l4_len in 0..=min {
            let mut bytes = full[..14 + 20 + l4_len].to_vec();
            bytes[16..18].copy_from_slice(&(20 + l4_len as u16).to_be_bytes());
            let got = classify(&bytes);
            if l4_len < min {
                assert_eq!(got, Err(DropReason::Truncated), "proto {proto} l4 {l4_len}");
            } else {
                assert_eq!(
                    got.map(|f| f.dst_port),
                    Ok(if proto == ICMP { 0 } else { 2 })
                );
            }
        }
    }
    for (proto, min) in [(TCP, 20), (UDP, 8), (SCTP, 12), (ICMPV6, 4)] {
        let mut s = Spec::v6(v6addr(1), v6addr(2), proto, 1, 2);
        s.payload = 0;
        let full = s.build();
        for l4_len in 0..=min {
            let mut bytes = full[..14 + 40 + l4_len].to_vec();
            bytes[18..20].copy_from_slice(&(l4_len as u16).to_be_bytes());
            assert_eq!(
                classify(&bytes).is_ok(),
                l4_len == min,
                "proto {proto} l4 {l4_len}"
            );
        }
    }
}
