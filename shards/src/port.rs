//! The port I/O traits that every NIC backend implements, and the frame batch they fill.
//!
//! A backend (AF_XDP, AF_PACKET, netmap, macvtap, or the in-memory [`crate::memport`]) hands
//! each worker one [`RxQueue`] and one [`TxQueue`] per NIC receive/transmit queue it owns.
//! Receiving *lends* frames: the slices in a [`FrameBatch`] point into the backend's ring and
//! stay valid until the next call to [`RxQueue::recv`] (the borrow checker enforces this), so
//! the data plane never copies a frame before it knows where it goes.

/// The largest number of frames one batch holds.
pub const MAX_BATCH: usize = 64;

/// Up to [`MAX_BATCH`] borrowed frames. Fixed capacity, never allocates.
pub struct FrameBatch<'a> {
    frames: [&'a [u8]; MAX_BATCH],
    len: usize,
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
            len: 0,
        }
    }

    /// Appends a frame; returns `false` (and drops nothing) when the batch is full.
    #[inline]
    pub fn push(&mut self, frame: &'a [u8]) -> bool {
        if self.len == MAX_BATCH {
            return false;
        }
        self.frames[self.len] = frame;
        self.len += 1;
        true
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
}

/// One NIC transmit queue (or any other sink of frames).
pub trait TxQueue: Send {
    /// Copies as many of `frames` as fit into the ring, in order, and starts transmission.
    /// Returns how many were accepted; the caller counts the rest as dropped.
    fn send(&mut self, frames: &[&[u8]]) -> usize;

    /// Pushes out frames an earlier `send` accepted but could not start yet (a ring whose
    /// kernel side was busy). Called by the worker once per loop, so that nothing waits in a
    /// ring while the worker sleeps. Must be cheap when nothing is pending. The default does
    /// nothing.
    fn flush(&mut self) {}
}
