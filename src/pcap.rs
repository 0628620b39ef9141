//! `PCAP_LOG`: a copy of every frame the switch receives from or sends to a NIC, in a pcap
//! file (Ethernet link type) that tcpdump and Wireshark read.
//!
//! The NIC's queues are wrapped ([`PcapRx`], [`PcapTx`]); the writer is shared by all queues
//! of all workers behind one mutex, taken once per batch. This is a debugging aid: with
//! `PCAP_LOG` unset nothing is wrapped and the data path is untouched.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use usnetd_shards::port::{FrameBatch, RxQueue, TxQueue};

/// The pcap file header: magic, version 2.4, UTC, snaplen 65535, link type 1 (Ethernet).
fn file_header() -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    h[16..20].copy_from_slice(&65535u32.to_le_bytes());
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h
}

/// A pcap file shared by the queues that write into it.
pub struct PcapLog {
    out: Mutex<BufWriter<File>>,
}

impl PcapLog {
    /// Creates (truncates) the file and writes its header.
    pub fn create(path: &Path) -> io::Result<Arc<PcapLog>> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        out.write_all(&file_header())?;
        Ok(Arc::new(PcapLog {
            out: Mutex::new(out),
        }))
    }

    /// Appends `frames` with one timestamp. Write errors are logged, never fatal.
    pub fn write_batch(&self, frames: &[&[u8]]) {
        if frames.is_empty() {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (sec, usec) = (now.as_secs() as u32, now.subsec_micros());
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        for f in frames {
            let len = f.len().min(65535) as u32;
            let mut rec = [0u8; 16];
            rec[0..4].copy_from_slice(&sec.to_le_bytes());
            rec[4..8].copy_from_slice(&usec.to_le_bytes());
            rec[8..12].copy_from_slice(&len.to_le_bytes());
            rec[12..16].copy_from_slice(&(f.len() as u32).to_le_bytes());
            if let Err(e) = out
                .write_all(&rec)
                .and_then(|()| out.write_all(&f[..len as usize]))
            {
                log::warn!("PCAP_LOG: {e}");
                return;
            }
        }
    }

    /// Writes buffered records to the file.
    pub fn flush(&self) {
        if let Err(e) = self.out.lock().unwrap_or_else(|p| p.into_inner()).flush() {
            log::warn!("PCAP_LOG: {e}");
        }
    }
}

/// A NIC receive queue whose frames are also written to a [`PcapLog`].
pub struct PcapRx {
    /// The wrapped queue.
    pub inner: Box<dyn RxQueue>,
    /// Where copies go.
    pub log: Arc<PcapLog>,
}

impl RxQueue for PcapRx {
    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        let start = batch.len();
        let n = self.inner.recv(batch);
        self.log.write_batch(&batch.as_slice()[start..]);
        n
    }

    fn prepare_wait(&mut self) -> Option<i32> {
        self.inner.prepare_wait()
    }

    fn finish_wait(&mut self) {
        self.inner.finish_wait();
    }

    fn take_ring_drops(&mut self) -> u64 {
        self.inner.take_ring_drops()
    }
}

/// A NIC transmit queue whose accepted frames are also written to a [`PcapLog`].
pub struct PcapTx {
    /// The wrapped queue.
    pub inner: Box<dyn TxQueue>,
    /// Where copies go.
    pub log: Arc<PcapLog>,
}

impl TxQueue for PcapTx {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        let n = self.inner.send(frames);
        self.log.write_batch(&frames[..n.min(frames.len())]);
        n
    }

    fn accepts_offloads(&self) -> bool {
        self.inner.accepts_offloads()
    }

    fn send_offloaded(
        &mut self,
        frames: &[&[u8]],
        offloads: &[usnetd_shards::offload::VnetHdr],
    ) -> usize {
        let n = self.inner.send_offloaded(frames, offloads);
        self.log.write_batch(&frames[..n.min(frames.len())]);
        n
    }

    fn flush(&mut self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<Vec<u8>>);
    impl RxQueue for Fixed {
        fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
            self.0
                .iter()
                .map(|f| batch.push(f))
                .filter(|&ok| ok)
                .count()
        }
    }
    struct Half;
    impl TxQueue for Half {
        fn send(&mut self, frames: &[&[u8]]) -> usize {
            frames.len() / 2
        }
    }

    #[test]
    fn writes_a_readable_pcap() {
        let path = std::env::temp_dir().join(format!("usnetd-pcap-{}.pcap", std::process::id()));
        let log = PcapLog::create(&path).unwrap();
        let mut rx = PcapRx {
            inner: Box::new(Fixed(vec![vec![1; 60], vec![2; 70]])),
            log: log.clone(),
        };
        let mut batch = FrameBatch::new();
        assert_eq!(rx.recv(&mut batch), 2);
        let mut tx = PcapTx {
            inner: Box::new(Half),
            log: log.clone(),
        };
        assert_eq!(tx.send(&[&[3u8; 80][..], &[4u8; 90][..]]), 1);
        log.flush();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&bytes[..24], &file_header());
        // Three records: 60, 70 (received) and 80 (the one accepted for transmit).
        let mut off = 24;
        for (len, fill) in [(60usize, 1u8), (70, 2), (80, 3)] {
            let incl = u32::from_le_bytes(bytes[off + 8..off + 12].try_into().unwrap()) as usize;
            let orig = u32::from_le_bytes(bytes[off + 12..off + 16].try_into().unwrap()) as usize;
            assert_eq!((incl, orig), (len, len));
            assert!(bytes[off + 16..off + 16 + len].iter().all(|&b| b == fill));
            off += 16 + len;
        }
        assert_eq!(off, bytes.len());
    }
}
