//! A per-vCPU dirty ring, the KVM model: the vCPU pushes the page number of every page it
//! turns from clean to dirty; user space reaps the ring. When the ring holds `soft_limit`
//! entries the vCPU exits with `DIRTY_RING_FULL` and cannot run until it is reaped. As in
//! KVM (`kvm_dirty_ring_get_rsvd_entries`), the soft limit keeps 64 entries free plus, on
//! Intel VMX, the 512-entry PML buffer whose pages land in the ring when it drains: a
//! 4096-entry ring is soft-full at 3520 entries, a 2048-entry one at 1472.
//!
//! Single producer (the owning vCPU) and single consumer (the reaper, serialised by the
//! tracker's reap lock). `tail` is only written by the producer and `head` only by the
//! consumer, so each side's counter update is a plain store.

use std::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};

use crate::Error;

/// Entries kept free above the soft limit, as KVM reserves room for writes already in
/// flight when the ring fills (KVM_DIRTY_RING_RSVD_ENTRIES).
pub const RESERVED_ENTRIES: usize = 64;
/// VMX's PML buffer (`cpu_dirty_log_size`), also reserved when the host logs with PML.
pub const PML_ENTRIES: usize = 512;
pub const MIN_RING_SIZE: usize = 256;
pub const MAX_RING_SIZE: usize = 65536;

pub struct DirtyRing {
    entries: Box<[AtomicU64]>,
    /// Total entries ever pushed (producer-owned).
    tail: AtomicUsize,
    /// Total entries ever reaped (consumer-owned).
    head: AtomicUsize,
    soft_limit: usize,
}

impl DirtyRing {
    /// A ring of `size` entries; `pml` reserves the PML buffer's entries too (Intel VMX).
    pub fn new(size: usize, pml: bool) -> Result<Self, Error> {
        if !size.is_power_of_two() || !(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&size) {
            return Err(Error::Config(format!(
                "dirty ring size {size} must be a power of two in {MIN_RING_SIZE}..={MAX_RING_SIZE}"
            )));
        }
        let reserved = Self::reserved_entries(pml);
        if size <= reserved {
            return Err(Error::Config(format!(
                "dirty ring size {size} leaves no room beside KVM's {reserved} reserved entries \
                 ({RESERVED_ENTRIES} + the {PML_ENTRIES}-entry PML buffer): use at least 1024, or PML off"
            )));
        }
        Ok(Self {
            entries: (0..size).map(|_| AtomicU64::new(0)).collect(),
            tail: AtomicUsize::new(0),
            head: AtomicUsize::new(0),
            soft_limit: size - reserved,
        })
    }

    pub fn reserved_entries(pml: bool) -> usize {
        RESERVED_ENTRIES + if pml { PML_ENTRIES } else { 0 }
    }

    pub fn size(&self) -> usize {
        self.entries.len()
    }

    pub fn soft_limit(&self) -> usize {
        self.soft_limit
    }

    pub fn len(&self) -> usize {
        self.tail
            .load(Acquire)
            .wrapping_sub(self.head.load(Acquire))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_soft_full(&self) -> bool {
        self.len() >= self.soft_limit
    }

    /// Producer side. Returns false (and drops nothing: the caller has not yet marked) only
    /// if the ring is completely full, which the soft-limit exit prevents for vCPUs.
    pub fn push(&self, page: u64) -> bool {
        let tail = self.tail.load(Relaxed);
        if tail.wrapping_sub(self.head.load(Acquire)) >= self.entries.len() {
            return false;
        }
        self.entries[tail & (self.entries.len() - 1)].store(page, Relaxed);
        self.tail.store(tail.wrapping_add(1), Release);
        true
    }

    /// Consumer side: hands every entry present now to `f` and frees them.
    /// Callers serialise reaping (the tracker's reap lock).
    pub fn reap(&self, mut f: impl FnMut(u64)) -> usize {
        let head = self.head.load(Relaxed);
        let tail = self.tail.load(Acquire);
        let n = tail.wrapping_sub(head);
        for i in 0..n {
            f(self.entries[head.wrapping_add(i) & (self.entries.len() - 1)].load(Relaxed));
        }
        self.head.store(tail, Release);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_must_be_power_of_two_in_range() {
        assert!(DirtyRing::new(1000, false).is_err());
        assert!(DirtyRing::new(128, false).is_err());
        assert!(DirtyRing::new(1 << 17, false).is_err());
        let r = DirtyRing::new(2048, false).unwrap();
        assert_eq!(r.soft_limit(), 2048 - RESERVED_ENTRIES);
    }

    #[test]
    fn pml_reserves_its_buffer_as_kvm_does() {
        // kvm_dirty_ring_get_rsvd_entries: 64 + kvm_cpu_dirty_log_size() (512 with PML).
        assert_eq!(DirtyRing::new(4096, true).unwrap().soft_limit(), 3520);
        assert_eq!(DirtyRing::new(2048, true).unwrap().soft_limit(), 1472);
        let err = DirtyRing::new(512, true)
            .err()
            .expect("too small for the reserve");
        assert!(err.to_string().contains("576 reserved entries"), "{err}");
        assert_eq!(DirtyRing::new(512, false).unwrap().soft_limit(), 448);
    }

    #[test]
    fn push_reap_fifo_and_soft_full() {
        let r = DirtyRing::new(256, false).unwrap();
        for p in 0..r.soft_limit() as u64 {
            assert!(!r.is_soft_full());
            assert!(r.push(p));
        }
        assert!(r.is_soft_full());
        let mut got = vec![];
        assert_eq!(r.reap(|p| got.push(p)), r.soft_limit());
        assert_eq!(got, (0..r.soft_limit() as u64).collect::<Vec<_>>());
        assert!(r.is_empty());
    }

    #[test]
    fn hard_full_refuses() {
        let r = DirtyRing::new(256, false).unwrap();
        for p in 0..256 {
            assert!(r.push(p));
        }
        assert!(!r.push(999));
        assert_eq!(r.reap(|_| {}), 256);
        assert!(r.push(1));
    }

    #[test]
    fn concurrent_producer_consumer_loses_nothing() {
        let r = DirtyRing::new(256, false).unwrap();
        let n = 200_000u64;
        let mut seen = Vec::with_capacity(n as usize);
        std::thread::scope(|s| {
            s.spawn(|| {
                for p in 0..n {
                    while !r.push(p) {
                        std::hint::spin_loop();
                    }
                }
            });
            while (seen.len() as u64) < n {
                r.reap(|p| seen.push(p));
            }
        });
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }
}
