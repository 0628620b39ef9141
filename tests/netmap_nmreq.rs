//! The `struct nmreq` handed to pipe clients, the pipe id pools, and the backend without
//! a netmap module.
#![cfg(feature = "netmap")]

use std::io;

use usnetd::backend::netmap::nmreq::{self, Registration, NMREQ_SIZE};
use usnetd::backend::netmap::pipe::{self, PipeIdPool};
use usnetd::backend::netmap::port::NetmapDevice;
use usnetd::backend::netmap::NetmapBackend;
use usnetd::backend::Backend;

/// The legacy `struct nmreq` of net/netmap_legacy.h, written down independently:
/// (field, offset, size).
const LAYOUT: &[(&str, usize, usize)] = &[
    ("nr_name", 0, 16),
    ("nr_version", 16, 4),
    ("nr_offset", 20, 4),
    ("nr_memsize", 24, 4),
    ("nr_tx_slots", 28, 4),
    ("nr_rx_slots", 32, 4),
    ("nr_tx_rings", 36, 2),
    ("nr_rx_rings", 38, 2),
    ("nr_ringid", 40, 2),
    ("nr_cmd", 42, 2),
    ("nr_arg1", 44, 2),
    ("nr_arg2", 46, 2),
    ("nr_arg3", 48, 4),
    ("nr_flags", 52, 4),
    ("spare2", 56, 4),
];
const SIZE: usize = 60;
const NR_REG_ONE_NIC: u32 = 4;
const NR_REG_SW: u32 = 2;
const NR_REG_PIPE_MASTER: u32 = 5;
const NR_REG_PIPE_SLAVE: u32 = 6;

fn field<'a>(bytes: &'a [u8], name: &str) -> &'a [u8] {
    let &(_, off, size) = LAYOUT.iter().find(|f| f.0 == name).unwrap();
    &bytes[off..off + size]
}

fn u32_of(b: &[u8]) -> u32 {
    u32::from_ne_bytes(b.try_into().unwrap())
}

fn u16_of(b: &[u8]) -> u16 {
    u16::from_ne_bytes(b.try_into().unwrap())
}

#[test]
fn layout_table_covers_the_struct() {
    assert_eq!(NMREQ_SIZE, SIZE);
    let mut end = 0;
    for &(_, off, size) in LAYOUT {
        assert_eq!(off, end, "fields are contiguous");
        end = off + size;
    }
    assert_eq!(end, SIZE);
}

#[test]
fn pipe_master_request_bytes() {
    let mut req = nmreq::request("eth0", Registration::PipeMaster(4094)).unwrap();
    // What the kernel fills in on NIOCREGIF.
    req.nr_offset = 0x1234;
    req.nr_memsize = 0x0400_0000;
    req.nr_tx_slots = 1024;
    req.nr_rx_slots = 512;
    req.nr_tx_rings = 1;
    req.nr_rx_rings = 1;
    req.nr_arg2 = 3;
    let bytes = nmreq::to_bytes(&req);
    assert_eq!(bytes.len(), SIZE);
    let mut name = [0u8; 16];
    name[..4].copy_from_slice(b"eth0");
    assert_eq!(field(&bytes, "nr_name"), &name);
    assert_eq!(u32_of(field(&bytes, "nr_version")), 14);
    assert_eq!(u32_of(field(&bytes, "nr_offset")), 0x1234);
    assert_eq!(u32_of(field(&bytes, "nr_memsize")), 0x0400_0000);
    assert_eq!(u32_of(field(&bytes, "nr_tx_slots")), 1024);
    assert_eq!(u32_of(field(&bytes, "nr_rx_slots")), 512);
    assert_eq!(u16_of(field(&bytes, "nr_tx_rings")), 1);
    assert_eq!(u16_of(field(&bytes, "nr_rx_rings")), 1);
    // nm_open("netmap:eth0{4094"): the pipe id in nr_ringid, the mode in nr_flags.
    assert_eq!(u16_of(field(&bytes, "nr_ringid")), 4094);
    assert_eq!(u32_of(field(&bytes, "nr_flags")), NR_REG_PIPE_MASTER);
    assert_eq!(u16_of(field(&bytes, "nr_cmd")), 0);
    assert_eq!(u16_of(field(&bytes, "nr_arg1")), 0);
    assert_eq!(u16_of(field(&bytes, "nr_arg2")), 3);
    assert_eq!(u32_of(field(&bytes, "nr_arg3")), 0);
    assert_eq!(u32_of(field(&bytes, "spare2")), 0);
}

#[test]
fn registration_modes() {
    let cases = [
        (Registration::OneNic(3), NR_REG_ONE_NIC, 3),
        (Registration::Host, NR_REG_SW, 0),
        (Registration::PipeSlave(7), NR_REG_PIPE_SLAVE, 7),
        (Registration::PipeMaster(0), NR_REG_PIPE_MASTER, 0),
    ];
    for (reg, flags, ringid) in cases {
        let bytes = nmreq::to_bytes(&nmreq::request("enp1s0f0", reg).unwrap());
        assert_eq!(u32_of(field(&bytes, "nr_flags")), flags, "{reg:?}");
        assert_eq!(u16_of(field(&bytes, "nr_ringid")), ringid, "{reg:?}");
        assert_eq!(&field(&bytes, "nr_name")[..9], b"enp1s0f0\0");
    }
    assert!(nmreq::request("eth0", Registration::PipeMaster(4096)).is_err());
}

#[test]
fn bad_interface_names_are_refused() {
    for name in [
        "",
        "0123456789abcdef",
        "eth0{1",
        "eth0}1",
        "eth0^",
        "a b",
        "x:y",
        "a\0b",
    ] {
        let e = nmreq::request(name, Registration::Host).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name:?}");
    }
    assert!(nmreq::request("br-lan", Registration::Host).is_ok());
    assert!(nmreq::request("0123456789abcde", Registration::Host).is_ok());
}

#[test]
fn pipe_id_pool_allocates_exhausts_and_gives_back() {
    let pool = PipeIdPool::new([10, 11, 12]);
    let a = pool.allocate().unwrap();
    let b = pool.allocate().unwrap();
    let c = pool.allocate().unwrap();
    assert_eq!((a.get(), b.get(), c.get()), (10, 11, 12));
    assert!(pool.allocate().is_none(), "exhausted");
    assert_eq!(pool.free(), 0);
    drop(b);
    assert_eq!(pool.free(), 1);
    let d = pool.allocate().unwrap();
    assert_eq!(d.get(), 11);
    drop((a, c));
    // Given back at the end of the queue: the most recently freed id is reused last.
    assert_eq!(pool.allocate().unwrap().get(), 10);
}

#[test]
fn static_and_dynamic_ranges_do_not_overlap() {
    let statics = PipeIdPool::static_pipes();
    assert_eq!(statics.allocate().unwrap().get(), 4094);
    let first = statics.allocate().unwrap();
    let second = statics.allocate().unwrap();
    assert_eq!((first.get(), second.get()), (4093, 4092), "counting down");
    let dynamic = PipeIdPool::dynamic();
    assert_eq!(dynamic.free(), pipe::DYNAMIC_PIPE_IDS.len());
    assert!(pipe::DYNAMIC_PIPE_IDS.end() < pipe::STATIC_PIPE_IDS.start());
    assert!(*pipe::STATIC_PIPE_IDS.end() <= 4094);
}

#[test]
fn missing_device_is_not_found() {
    let dir = std::env::temp_dir().join(format!("usnetd-netmap-test-{}", std::process::id()));
    let device = NetmapDevice::new(dir.join("no-such-netmap"));
    let backend = NetmapBackend::with_device(device.clone(), true);
    assert_eq!(backend.name(), "netmap");
    let e = backend.open("eth0", 2).err().expect("no netmap here");
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().contains("netmap module not loaded"), "{e}");
    assert_eq!(
        backend.open_host_rings("eth0").err().unwrap().kind(),
        io::ErrorKind::NotFound
    );
    // A failed pipe creation gives its id back.
    let pool = PipeIdPool::new([1]);
    let e = pipe::create_pipe(&device, &pool, "eth0", true)
        .err()
        .unwrap();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert_eq!(pool.free(), 1);
    let e = pipe::create_pipe(&device, &pool, "eth0{1", true)
        .err()
        .unwrap();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
}
