//! An AF_PACKET transmit queue on a `PACKET_TX_RING` (TPACKET_V2, `PACKET_QDISC_BYPASS`):
//! frames are written into a ring shared with the kernel, and one `send(2)` makes the kernel
//! transmit every frame marked ready (instead of one `sendmmsg` entry per frame).
//!
//! A slot is `TP_STATUS_AVAILABLE` (ours), `TP_STATUS_SEND_REQUEST` (handed over) or
//! `TP_STATUS_SENDING`; the kernel makes it available again once the frame has left (the skb
//! is freed). A frame the NIC refuses (full backlog) stays `SEND_REQUEST` and goes with the
//! next kick, so no frame is lost silently. Frames the kernel finds malformed are marked
//! `TP_STATUS_WRONG_FORMAT`; they are counted and their slots reused.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use usnetd_shards::port::TxQueue;

const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_WRONG_FORMAT: u32 = 4;
/// Frame data starts after the `tpacket2_hdr` (32 bytes, TPACKET_ALIGNed) when the socket
/// does not set `PACKET_TX_HAS_OFF` (`TPACKET2_HDRLEN - sizeof(struct sockaddr_ll)`).
const DATA_OFFSET: usize = 32;
const SLOT_SIZE: usize = 2048;
const BLOCK_SIZE: usize = 1 << 16;

/// One TPACKET_V2 transmit ring bound to an interface.
pub struct TxRing {
    fd: OwnedFd,
    ring: NonNull<u8>,
    slots: usize,
    head: usize,
    /// Frames the kernel marked malformed.
    pub wrong_format: u64,
    /// Frames longer than a slot: skipped (counted as accepted by `send`).
    pub too_long: u64,
}

// SAFETY: the ring is used by one thread at a time (all methods take `&mut self`); the kernel
// synchronises through each slot's atomic status word.
unsafe impl Send for TxRing {}

fn os_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn set_int(fd: i32, name: libc::c_int, value: libc::c_int, what: &str) -> io::Result<()> {
    // SAFETY: setsockopt with a c_int of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(os_error(what));
    }
    Ok(())
}

impl TxRing {
    /// A ring of `slots` frames (rounded up to whole 64 KiB blocks) on `ifname` in the calling
    /// thread's network namespace.
    pub fn open(ifname: &str, slots: usize) -> io::Result<TxRing> {
        let ifindex = usnetd::backend::xdp::ifindex(ifname)?;
        // SAFETY: plain socket creation; owned right below. Protocol 0: receives nothing.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(os_error("socket(AF_PACKET)"));
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_int(
            raw,
            libc::PACKET_VERSION,
            libc::tpacket_versions::TPACKET_V2 as libc::c_int,
            "PACKET_VERSION",
        )?;
        set_int(raw, libc::PACKET_QDISC_BYPASS, 1, "PACKET_QDISC_BYPASS")?;
        let per_block = BLOCK_SIZE / SLOT_SIZE;
        let blocks = slots.div_ceil(per_block).clamp(1, 1024);
        let req = libc::tpacket_req {
            tp_block_size: BLOCK_SIZE as u32,
            tp_block_nr: blocks as u32,
            tp_frame_size: SLOT_SIZE as u32,
            tp_frame_nr: (blocks * per_block) as u32,
        };
        // SAFETY: setsockopt with a `struct tpacket_req` of the right size.
        let r = unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_PACKET,
                libc::PACKET_TX_RING,
                (&req as *const libc::tpacket_req).cast(),
                std::mem::size_of::<libc::tpacket_req>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(os_error("PACKET_TX_RING"));
        }
        let len = blocks * BLOCK_SIZE;
        // SAFETY: maps the socket's ring at an address the kernel picks; it aliases no Rust
        // object and is unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                raw,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_error("mmap(PACKET_TX_RING)"));
        }
        let ring = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| os_error("mmap"))?;
        let ring = TxRing {
            fd,
            ring,
            slots: blocks * per_block,
            head: 0,
            wrong_format: 0,
            too_long: 0,
        };
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: bind with a sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(os_error("bind(AF_PACKET)"));
        }
        Ok(ring)
    }

    fn slot(&self, i: usize) -> *mut u8 {
        // SAFETY: `i < slots`: inside the mapping (every slot is SLOT_SIZE bytes).
        unsafe { self.ring.as_ptr().add(i * SLOT_SIZE) }
    }

    fn status(&self, i: usize) -> &AtomicU32 {
        // SAFETY: the slot starts with the u32 `tp_status`, 4-aligned (slots are 2048-aligned
        // in a page-aligned mapping); the kernel accesses it concurrently, hence atomic.
        unsafe { &*(self.slot(i) as *const AtomicU32) }
    }

    /// Frames handed over that the kernel has not finished with.
    pub fn pending(&self) -> usize {
        (0..self.slots)
            .filter(|&i| self.status(i).load(Ordering::Acquire) != TP_STATUS_AVAILABLE)
            .count()
    }

    fn kick(&self) {
        // SAFETY: a non-blocking zero-length send: the kernel walks the ring.
        unsafe { libc::send(self.fd.as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT) };
    }
}

impl TxQueue for TxRing {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        let mut accepted = 0;
        for frame in frames {
            if frame.len() > SLOT_SIZE - DATA_OFFSET {
                self.too_long += 1;
                accepted += 1;
                continue;
            }
            let status = self.status(self.head).load(Ordering::Acquire);
            if status == TP_STATUS_WRONG_FORMAT {
                self.wrong_format += 1;
            } else if status != TP_STATUS_AVAILABLE {
                break;
            }
            let len = frame.len();
            let slot = self.slot(self.head);
            // SAFETY: the slot is ours (status AVAILABLE or WRONG_FORMAT: the kernel does not
            // touch it); `len` bytes fit after the header; `frame` is a separate slice.
            unsafe {
                std::ptr::copy_nonoverlapping(frame.as_ptr(), slot.add(DATA_OFFSET), len);
                // tp_len and tp_snaplen follow tp_status.
                (slot.add(4) as *mut u32).write(len as u32);
                (slot.add(8) as *mut u32).write(len as u32);
            }
            self.status(self.head)
                .store(TP_STATUS_SEND_REQUEST, Ordering::Release);
            self.head = (self.head + 1) % self.slots;
            accepted += 1;
        }
        self.kick();
        accepted
    }

    /// Kicks until the kernel has sent every frame handed over (at most one second).
    fn flush(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.pending() > 0 && Instant::now() < deadline {
            self.kick();
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

impl Drop for TxRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the ring mapped in `open`; nothing borrows it any more.
        unsafe {
            libc::munmap(
                self.ring.as_ptr().cast(),
                self.slots / (BLOCK_SIZE / SLOT_SIZE) * BLOCK_SIZE,
            )
        };
    }
}
