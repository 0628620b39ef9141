//! Receive packet steering (RPS) on the TAP: where the kernel processes the frames the switch
//! writes into it.
//!
//! A write(2) to a TAP runs the kernel's whole receive path for that frame (IP, UDP or TCP,
//! the socket's queue, waking its reader) inside the writer's system call, on the writer's
//! core: the switch's worker pays for the kernel's protocol processing. With RPS cores set on
//! the TAP's receive queues (`/sys/class/net/<TAP>/queues/rx-<N>/rps_cpus`), the write only
//! builds the socket buffer and queues it to one of those cores (chosen by flow hash), whose
//! softirq does the rest. That frees the worker, at the cost of an inter-processor interrupt
//! whenever the target core's queue was empty.
//!
//! The default ([`default_cores`]) is every online core that runs no worker and is not the
//! kernel-side core; when there is none, RPS stays off (steering to the workers' own cores
//! only moves the work between them and adds the interrupts). The setting lives on the TAP,
//! which the switch creates and which disappears with it, so nothing needs restoring.

use std::io;
use std::path::Path;

/// The online cores from `/sys/devices/system/cpu/online` (taskset syntax), or `None` when
/// it cannot be read.
pub fn online_cores() -> Option<Vec<usize>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    usnetd_shards::cores::parse_core_list(text.trim()).ok()
}

/// The default RPS cores: the `online` cores minus the `workers`' cores and `kernel_core`
/// (sorted; empty when every online core is taken).
pub fn default_cores(online: &[usize], workers: &[usize], kernel_core: usize) -> Vec<usize> {
    let mut cores: Vec<usize> = online
        .iter()
        .copied()
        .filter(|c| *c != kernel_core && !workers.contains(c))
        .collect();
    cores.sort_unstable();
    cores.dedup();
    cores
}

/// The kernel's CPU bitmap syntax for `cores`: hexadecimal, in comma-separated groups of 32
/// bits, most significant first (`[0, 1]` is `3`, `[33]` is `2,00000000`); `0` when empty.
pub fn cpu_mask(cores: &[usize]) -> String {
    let Some(&max) = cores.iter().max() else {
        return "0".to_string();
    };
    let mut words = vec![0u32; max / 32 + 1];
    for &c in cores {
        words[c / 32] |= 1 << (c % 32);
    }
    let mut out = String::new();
    for (i, w) in words.iter().rev().enumerate() {
        if i == 0 {
            out.push_str(&format!("{w:x}"));
        } else {
            out.push_str(&format!(",{w:08x}"));
        }
    }
    out
}

/// Writes the RPS cores of every receive queue of interface `ifname`, whose index in the
/// caller's network namespace is `ifindex` (an empty list turns RPS off). Returns how many
/// queues were set. Refuses when `/sys` shows another interface of that name (a `/sys`
/// mounted for another network namespace than the caller's). Errors name the file.
pub fn set_rps_cores(ifname: &str, ifindex: u64, cores: &[usize]) -> io::Result<usize> {
    set_rps_cores_under(Path::new("/sys/class/net"), ifname, ifindex, cores)
}

/// [`set_rps_cores`] with the sysfs directory as a parameter (for tests).
fn set_rps_cores_under(
    sys_net: &Path,
    ifname: &str,
    ifindex: u64,
    cores: &[usize],
) -> io::Result<usize> {
    let index_file = sys_net.join(ifname).join("ifindex");
    let shown = std::fs::read_to_string(&index_file)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", index_file.display())))?;
    if shown.trim().parse::<u64>().ok() != Some(ifindex) {
        return Err(io::Error::other(format!(
            "{} is {}, not {ifindex}: /sys belongs to another network namespace",
            index_file.display(),
            shown.trim()
        )));
    }
    let queues_dir = sys_net.join(ifname).join("queues");
    let entries = std::fs::read_dir(&queues_dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", queues_dir.display())))?;
    let mask = cpu_mask(cores);
    let mut set = 0;
    for entry in entries {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with("rx-") {
            continue;
        }
        let file = entry.path().join("rps_cpus");
        std::fs::write(&file, format!("{mask}\n"))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        set += 1;
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_use_the_kernel_bitmap_syntax() {
        assert_eq!(cpu_mask(&[]), "0");
        assert_eq!(cpu_mask(&[0]), "1");
        assert_eq!(cpu_mask(&[0, 1]), "3");
        assert_eq!(cpu_mask(&[1, 4, 7]), "92");
        assert_eq!(cpu_mask(&[31]), "80000000");
        assert_eq!(cpu_mask(&[32]), "1,00000000");
        assert_eq!(cpu_mask(&[0, 33]), "2,00000001");
        assert_eq!(cpu_mask(&[64, 3]), "1,00000000,00000008");
    }

    #[test]
    fn default_cores_leave_out_the_switch() {
        let online: Vec<usize> = (0..8).collect();
        assert_eq!(default_cores(&online, &[0], 0), vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(default_cores(&online, &[2, 3], 7), vec![0, 1, 4, 5, 6]);
        assert_eq!(default_cores(&[0, 1], &[0, 1], 0), Vec::<usize>::new());
        assert_eq!(default_cores(&[0, 1], &[0], 1), Vec::<usize>::new());
        // Workers on cores that are not online do not matter.
        assert_eq!(default_cores(&[0, 1], &[5], 5), vec![0, 1]);
    }

    #[test]
    fn writes_every_rx_queue_and_only_those() {
        let dir = std::env::temp_dir().join(format!("usnetd-rps-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let queues = dir.join("tap0").join("queues");
        for q in ["rx-0", "rx-1", "tx-0"] {
            std::fs::create_dir_all(queues.join(q)).unwrap();
        }
        std::fs::write(dir.join("tap0").join("ifindex"), "7\n").unwrap();
        let other = set_rps_cores_under(&dir, "tap0", 8, &[2, 3]).unwrap_err();
        assert!(
            other.to_string().contains("another network namespace"),
            "{other}"
        );
        assert!(!queues.join("rx-0").join("rps_cpus").exists());
        assert_eq!(set_rps_cores_under(&dir, "tap0", 7, &[2, 3]).unwrap(), 2);
        for q in ["rx-0", "rx-1"] {
            let text = std::fs::read_to_string(queues.join(q).join("rps_cpus")).unwrap();
            assert_eq!(text, "c\n");
        }
        assert!(!queues.join("tx-0").join("rps_cpus").exists());
        let missing = set_rps_cores_under(&dir, "nosuch", 1, &[1]).unwrap_err();
        assert!(missing.to_string().contains("nosuch"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
