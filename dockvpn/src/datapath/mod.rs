//! The VPN data path below the engines: the tun device with its offloads, the sans-IO
//! segmentation of what the tun hands over, and batched UDP sockets. The driver (`vpn.rs`)
//! moves packets between them and the engines in reused buffers.

pub mod offload;
pub mod tun;
pub mod udp;

/// What the data path's tests share: a namespace of their own and an independent checksum.
#[cfg(test)]
pub(crate) mod test_support {
    /// Runs `test` on a thread of its own in a new network namespace (unshare moves only the
    /// calling thread), so its devices, routes and sockets never touch the test process's
    /// namespace and vanish with the thread. Without root the test fails: a skipped check
    /// would pass silently.
    pub fn in_new_network_namespace<T: Send + 'static>(
        test_name: &str,
        test: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        assert!(
            nix::unistd::geteuid().is_root(),
            "{test_name}: creating a network namespace needs root: run the tests as root (cargo xtask test does)"
        );
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            test()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// An independent checker: sums 16-bit words one at a time, as RFC 1071 spells it (an
    /// odd chunk is padded with a zero byte).
    pub fn ones_complement_sum(chunks: &[&[u8]]) -> u16 {
        let mut sum: u32 = 0;
        for chunk in chunks {
            for pair in chunk.chunks(2) {
                sum += u32::from(pair[0]) << 8 | u32::from(pair.get(1).copied().unwrap_or(0));
                sum = (sum & 0xffff) + (sum >> 16);
            }
        }
        sum as u16
    }
}
