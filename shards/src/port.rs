//! The port I/O traits that every NIC backend implements, and the frame batch they fill.
//!
//! A backend (AF_XDP, AF_PACKET, netmap, macvtap, or the in-memory [`crate::memport`]) hands
//! each worker one [`RxQueue`] and one [`TxQueue`] per NIC receive/transmit queue it owns.
//! Receiving *lends* frames: the slices in a [`FrameBatch`] point into the backend's ring and
//! stay valid until the next call to [`RxQueue::recv`] (the borrow checker enforces this), so
//! the data plane never copies a frame before it knows where it goes.

use crate::offload::VnetHdr;

/// The largest number of frames one batch holds.
pub const MAX_BATCH: usize = 64;

/// Up to [`MAX_BATCH`] borrowed frames. Fixed capacity, never allocates.
///
/// A frame may carry offload metadata ([`VnetHdr`]: a partial checksum, or a TCP
/// super-segment from GRO/TSO) when the backend passes such frames whole; see
/// [`FrameBatch::push_offloaded`] and [`crate::offload`]. Plain frames carry none.
pub struct FrameBatch<'a> {
    frames: [&'a [u8]; MAX_BATCH],
    /// Per-frame metadata; meaningful only while `offloaded` (otherwise all plain).
    offloads: [VnetHdr; MAX_BATCH],
    len: usize,
    /// Whether some frame of the batch carries metadata.
    offloaded: bool,
}

impl<'a> Default for FrameBatch<'a> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> FrameBatch<'a> {
    /// An empty batch.
    #[inline]
    pub const fn new() -> Self {
        FrameBatch {
            frames: [&[]; MAX_BATCH],
            offloads: [VnetHdr::PLAIN; MAX_BATCH],
            len: 0,
            offloaded: false,
        }
    }

    /// Appends a frame; returns `false` (and drops nothing) when the batch is full.
    #[inline]
    pub fn push(&mut self, frame: &'a [u8]) -> bool {
        if self.len == MAX_BATCH {
            return false;
        }
        self.frames[self.len] = frame;
        if self.offloaded {
            self.offloads[self.len] = VnetHdr::PLAIN;
        }
        self.len += 1;
        true
    }

    /// Appends a frame with its offload metadata; returns `false` when the batch is full.
    /// Plain metadata is the same as [`FrameBatch::push`].
    #[inline]
    pub fn push_offloaded(&mut self, frame: &'a [u8], offload: VnetHdr) -> bool {
        if offload.is_plain() {
            return self.push(frame);
        }
        if self.len == MAX_BATCH {
            return false;
        }
        // Entries before `len` are plain: `new` made them so, `push` keeps them so once
        // `offloaded` is set, and `clear` resets them.
        self.frames[self.len] = frame;
        self.offloads[self.len] = offload;
        self.offloaded = true;
        self.len += 1;
        true
    }

    /// The frames' offload metadata, in frame order, or `None` when every frame is plain
    /// (the common case, which then costs nothing).
    #[inline]
    pub fn offloads(&self) -> Option<&[VnetHdr]> {
        self.offloaded.then(|| &self.offloads[..self.len])
    }

    /// Whether the batch is full.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.len == MAX_BATCH
    }

    /// Number of frames in the batch.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch holds no frame.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes all frames.
    #[inline]
    pub fn clear(&mut self) {
        if self.offloaded {
            self.offloads[..self.len].fill(VnetHdr::PLAIN);
            self.offloaded = false;
        }
        self.len = 0;
    }

    /// The frames as a slice.
    #[inline]
    pub fn as_slice(&self) -> &[&'a [u8]] {
        &self.frames[..self.len]
    }
}

/// One NIC receive queue (or any other source of frames: an endpoint's channel).
pub trait RxQueue: Send {
    /// Lends up to `batch` capacity of received frames by pushing them into `batch`, without
    /// blocking. Frames lent by an earlier call are given back to the ring by this call.
    /// Returns the number of frames pushed.
    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize;

    /// Prepares to sleep until this queue has frames: arms whatever wake-up the channel
    /// needs and returns a file descriptor that becomes readable when frames wait, or `None`
    /// when the queue cannot be waited on (or already has frames): then the worker keeps
    /// polling. The default is `None`.
    fn prepare_wait(&mut self) -> Option<i32> {
        None
    }

    /// Undoes [`RxQueue::prepare_wait`] after the sleep. The default does nothing.
    fn finish_wait(&mut self) {}

    /// Frames the kernel dropped because this queue's ring was full, since the last call
    /// (they never reached the switch). May cost a syscall: the worker asks about twice a
    /// second. The default is 0 (a queue that cannot tell).
    fn take_ring_drops(&mut self) -> u64 {
        0
    }
}

/// One NIC transmit queue (or any other sink of frames).
pub trait TxQueue: Send {
    /// Copies as many of `frames` as fit into the ring, in order, and starts transmission.
    /// Returns how many were accepted; the caller counts the rest as dropped.
    fn send(&mut self, frames: &[&[u8]]) -> usize;

    /// Whether the queue takes frames with offload metadata whole
    /// ([`TxQueue::send_offloaded`]): TCP super-segments the NIC (or the kernel's software
    /// GSO behind the socket) cuts, partial checksums it completes. The default is `false`:
    /// the worker then makes wire frames first.
    fn accepts_offloads(&self) -> bool {
        false
    }

    /// Like [`TxQueue::send`], with each frame's offload metadata (`offloads[i]` belongs to
    /// `frames[i]`). Called only when [`TxQueue::accepts_offloads`]; the default ignores the
    /// metadata.
    fn send_offloaded(&mut self, frames: &[&[u8]], offloads: &[VnetHdr]) -> usize {
        let _ = offloads;
        self.send(frames)
    }

    /// Pushes out frames an earlier `send` accepted but could not start yet (a ring whose
    /// kernel side was busy). Called by the worker once per loop, so that nothing waits in a
    /// ring while the worker sleeps. Must be cheap when nothing is pending. The default does
    /// nothing.
    fn flush(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{F_NEEDS_CSUM, GSO_TCPV4};

    #[test]
    fn offload_metadata_follows_its_frame_and_plain_batches_carry_none() {
        let frames: Vec<Vec<u8>> = (0..MAX_BATCH as u8 + 1).map(|i| vec![i; 60]).collect();
        let gso = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..VnetHdr::PLAIN
        };
        let mut batch = FrameBatch::new();
        assert!(batch.push(&frames[0]));
        assert!(batch.push_offloaded(&frames[1], VnetHdr::PLAIN));
        assert_eq!(batch.offloads(), None, "plain metadata is no metadata");
        assert!(batch.push_offloaded(&frames[2], gso));
        assert!(batch.push(&frames[3]));
        assert_eq!(
            batch.offloads(),
            Some(&[VnetHdr::PLAIN, VnetHdr::PLAIN, gso, VnetHdr::PLAIN][..])
        );
        // A cleared batch forgets the metadata, also for slots filled by `push` later.
        batch.clear();
        assert_eq!(batch.offloads(), None);
        for f in &frames[..3] {
            assert!(batch.push(f));
        }
        assert!(batch.push_offloaded(&frames[3], gso));
        assert_eq!(
            batch.offloads(),
            Some(&[VnetHdr::PLAIN, VnetHdr::PLAIN, VnetHdr::PLAIN, gso][..])
        );
        while !batch.is_full() {
            assert!(batch.push(&frames[0]));
        }
        assert!(!batch.push_offloaded(&frames[MAX_BATCH], gso));
        assert_eq!(batch.len(), MAX_BATCH);
        assert_eq!(batch.offloads().map(<[_]>::len), Some(MAX_BATCH));
    }
}
