//! Property tests for the classifier: no input panics, and randomly generated valid frames
//! classify to exactly what they were built from (the builder in `classify_util` is the
//! reference model).

mod classify_util;

use classify_util::*;
use proptest::prelude::*;
use usnetd_shards::counters::DropReason;
use usnetd_shards::frame::classify;

fn tags() -> impl Strategy<Value = Vec<(u16, u16)>> {
    prop::collection::vec(
        (
            prop::sample::select(vec![0x8100u16, 0x88a8, 0x9100]),
            0u16..4096,
        ),
        0..=2,
    )
}

fn ports() -> impl Strategy<Value = u16> {
    prop_oneof![any::<u16>(), Just(67u16), Just(68u16)]
}

fn v4_addr() -> impl Strategy<Value = [u8; 4]> {
    any::<[u8; 4]>().prop_filter("not loopback", |a| a[0] != 127)
}

fn v6_addr() -> impl Strategy<Value = [u8; 16]> {
    any::<[u8; 16]>().prop_filter("not loopback or IPv4-mapped", |a| {
        let mut localhost = [0u8; 16];
        localhost[15] = 1;
        let mapped = a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff;
        *a != localhost && !mapped
    })
}

/// (offset, more): unfragmented, first, middle or last fragment.
fn frag_position() -> impl Strategy<Value = (u16, bool)> {
    prop_oneof![
        Just((0u16, false)),
        Just((0u16, true)),
        (1u16..4, any::<bool>()),
        (1u16..8192, any::<bool>()),
    ]
}

fn v4_net() -> impl Strategy<Value = (Net, u8)> {
    let protos = prop_oneof![
        prop::sample::select(vec![TCP, UDP, DCCP, SCTP, UDPLITE, ICMP, GRE]),
        any::<u8>(),
    ];
    (
        v4_addr(),
        v4_addr(),
        any::<u16>(),
        frag_position(),
        any::<bool>(),
        0u8..=10,
        protos,
    )
        .prop_map(|(src, dst, id, (mut offset, more), df, options, proto)| {
            if proto == TCP && offset == 1 {
                offset = 2; // offset 1 is the RFC 1858 overlap: Malformed
            }
            let net = Net::V4 {
                src,
                dst,
                id,
                offset,
                more,
                dont_fragment: df && offset == 0 && !more,
                options,
            };
            (net, proto)
        })
}

fn ext() -> impl Strategy<Value = Ext> {
    prop_oneof![
        (0u8..4).prop_map(Ext::Routing),
        (0u8..4).prop_map(Ext::DestOpts),
        (0u8..6).prop_map(Ext::Ah),
    ]
}

fn v6_net() -> impl Strategy<Value = (Net, u8)> {
    let protos = prop_oneof![
        prop::sample::select(vec![TCP, UDP, DCCP, SCTP, UDPLITE, ICMPV6, GRE, 50, 59]),
        any::<u8>().prop_filter("not an extension header", |p| {
            ![0u8, 43, 44, 51, 60].contains(p)
        }),
    ];
    (
        v6_addr(),
        v6_addr(),
        prop::option::of(0u8..4),
        prop::collection::vec(ext(), 0..=5),
        prop::option::of((frag_position(), any::<u32>(), any::<prop::sample::Index>())),
        protos,
    )
        .prop_map(|(src, dst, hbh, mut exts, frag, proto)| {
            if let Some(((offset, more), id, at)) = frag {
                let at = at.index(exts.len() + 1);
                exts.insert(at, Ext::Fragment { offset, more, id });
            }
            if let Some(len) = hbh {
                exts.insert(0, Ext::HopByHop(len));
            }
            (Net::V6 { src, dst, exts }, proto)
        })
}

fn spec() -> impl Strategy<Value = Spec> {
    let net = prop_oneof![
        4 => v4_net(),
        4 => v6_net(),
        1 => Just((Net::Arp, 0u8)),
        1 => (0u16..100).prop_map(|body| (Net::Eapol { body }, 0u8)),
    ];
    (
        any::<[u8; 6]>(),
        any::<[u8; 6]>(),
        tags(),
        net,
        ports(),
        ports(),
        prop_oneof![any::<u8>(), 128u8..=140],
        0usize..64,
        0usize..32,
    )
        .prop_map(
            |(
                dst_mac,
                src_mac,
                tags,
                (net, proto),
                src_port,
                dst_port,
                icmp_type,
                payload,
                padding,
            )| {
                Spec {
                    dst_mac,
                    src_mac,
                    tags,
                    net,
                    proto,
                    src_port,
                    dst_port,
                    icmp_type,
                    payload,
                    padding,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = classify(&bytes);
    }

    #[test]
    fn arbitrary_l3_never_panics(
        ethertype in prop::sample::select(vec![0x0800u16, 0x86dd, 0x0806, 0x888e, 0x8100, 0x88a8]),
        first in any::<u8>(),
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        // Steer random bytes into each parser: the right EtherType and IP version nibble.
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ethertype.to_be_bytes());
        let version = match ethertype { 0x0800 => 0x40, 0x86dd => 0x60, _ => 0 };
        frame.push(version | (first & 0x0f));
        frame.extend_from_slice(&body);
        let _ = classify(&frame);
    }

    #[test]
    fn valid_frames_classify_to_what_they_were_built_from(spec in spec()) {
        let bytes = spec.build();
        prop_assert_eq!(classify(&bytes), Ok(spec.expected()), "{:?}", spec);
        // Everything short of the announced lengths is truncated (padding may be cut).
        let unpadded = bytes.len() - spec.padding;
        for len in 0..unpadded {
            prop_assert_eq!(classify(&bytes[..len]), Err(DropReason::Truncated), "prefix {}", len);
        }
        for len in unpadded..bytes.len() {
            prop_assert_eq!(classify(&bytes[..len]), Ok(spec.expected()));
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        spec in spec(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = spec.build();
        for (at, value) in flips {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        if let Ok(f) = classify(&bytes) {
            // Whatever it accepts stays within the frame.
            prop_assert!(usize::from(f.l3_offset) < bytes.len());
            prop_assert!(!f.src_ip.is_loopback() && !f.dst_ip.is_loopback());
        }
    }
}
