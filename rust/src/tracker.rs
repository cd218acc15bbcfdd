//! Dirty tracking: a bitmap of `AtomicU64` words and, in ring mode, one dirty ring per vCPU.
//!
//! The `dirty` bitmap plays the part of KVM's write protection: bit set = the page has been
//! written since it was last collected, so further writes are not "faults" and not counted.
//!
//! * Bitmap mode: a harvest swaps each non-zero word to zero and reports its bits.
//! * Ring mode: a vCPU pushes every page it turns clean-to-dirty into its own ring. A reap
//!   moves ring entries into `collected` (QEMU's migration bitmap) and clears their dirty bit
//!   (re-protects). Writes that have no vCPU (the DMA writer) go straight to `collected`, as
//!   KVM's backup bitmap for the dirty ring. A harvest reaps, swaps `collected` to zero and
//!   clears those pages' dirty bits.
//!
//! No lost update: a writer stores the data, then sets the dirty bit with `Release`. Every
//! collector clears a dirty bit with an `AcqRel` read-modify-write *before* anyone reads the
//! page, and only then publishes the page (returning it, or setting `collected` with
//! `Release`, which the harvest's `Acquire` swap picks up). So for each write either its bit
//! update precedes a clear in the word's modification order (the collector that clears
//! acquires the data and the page is read after it), or it follows every clear (it finds the
//! bit clear, so it is a new transition that is pushed or published for a later harvest).

use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{AcqRel, Relaxed, Release, SeqCst},
};
use std::sync::Mutex;

use crate::ring::DirtyRing;
use crate::Error;

/// A fixed-size bitmap of atomic words.
pub struct Bitmap {
    words: Box<[AtomicU64]>,
    bits: usize,
}

impl Bitmap {
    pub fn new(bits: usize) -> Self {
        Self {
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Sets the bit; true if it was clear. `Release` publishes the caller's earlier writes.
    #[inline]
    pub fn set(&self, bit: usize) -> bool {
        let mask = 1u64 << (bit % 64);
        self.words[bit / 64].fetch_or(mask, Release) & mask == 0
    }

    /// Clears the bit with acquire semantics; true if it was set.
    #[inline]
    pub fn clear(&self, bit: usize) -> bool {
        let mask = 1u64 << (bit % 64);
        self.words[bit / 64].fetch_and(!mask, AcqRel) & mask != 0
    }

    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Relaxed).count_ones() as usize)
            .sum()
    }

    /// Bits set in this bitmap or `other` (same size), word by word.
    pub fn count_union(&self, other: &Bitmap) -> usize {
        self.words
            .iter()
            .zip(other.words.iter())
            .map(|(a, b)| (a.load(Relaxed) | b.load(Relaxed)).count_ones() as usize)
            .sum()
    }

    /// Calls `f` for every set bit in ascending order, leaving them set.
    pub fn scan(&self, mut f: impl FnMut(usize)) {
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.load(Relaxed);
            while bits != 0 {
                f(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
    }

    /// Clears the given bits (ascending or not), one `AcqRel` read-modify-write per word.
    pub fn clear_bits(&self, bits: &[u64]) {
        let mut word = usize::MAX;
        let mut mask = 0u64;
        for &b in bits {
            let (w, m) = (b as usize / 64, 1u64 << (b % 64));
            if w != word {
                if mask != 0 {
                    self.words[word].fetch_and(!mask, AcqRel);
                }
                (word, mask) = (w, 0);
            }
            mask |= m;
        }
        if mask != 0 {
            self.words[word].fetch_and(!mask, AcqRel);
        }
    }

    /// Takes and clears every set bit, calling `f` for each in ascending order. Zero words
    /// are skipped with a plain load: a bit set after that load is left for the next take.
    pub fn take(&self, mut f: impl FnMut(usize)) {
        for (i, w) in self.words.iter().enumerate() {
            if w.load(Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, AcqRel);
            while bits != 0 {
                f(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
    }

    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Release);
        }
    }
}

/// How a VM tracks dirty pages; fixed when the VM is built, as in KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackMode {
    Bitmap,
    /// `pml`: the host logs with Intel PML, whose buffer KVM reserves in the ring.
    Ring {
        size: usize,
        pml: bool,
    },
}

/// Who wrote a page.
#[derive(Clone, Copy, Debug)]
pub enum Writer {
    Vcpu(usize),
    Device,
}

pub struct DirtyTracker {
    mode: TrackMode,
    logging: AtomicBool,
    dirty: Bitmap,
    collected: Bitmap,
    rings: Vec<DirtyRing>,
    /// Serialises ring consumers (each ring is single-consumer).
    reap_lock: Mutex<()>,
}

impl DirtyTracker {
    pub fn new(pages: usize, mode: TrackMode, vcpus: usize) -> Result<Self, Error> {
        let rings = match mode {
            TrackMode::Bitmap => Vec::new(),
            TrackMode::Ring { size, pml } => (0..vcpus)
                .map(|_| DirtyRing::new(size, pml))
                .collect::<Result<_, _>>()?,
        };
        let collected_bits = if rings.is_empty() { 0 } else { pages };
        Ok(Self {
            mode,
            logging: AtomicBool::new(false),
            dirty: Bitmap::new(pages),
            collected: Bitmap::new(collected_bits),
            rings,
            reap_lock: Mutex::new(()),
        })
    }

    pub fn mode(&self) -> TrackMode {
        self.mode
    }

    pub fn pages(&self) -> usize {
        self.dirty.bits()
    }

    fn ring_mode(&self) -> bool {
        !self.rings.is_empty()
    }

    /// Clears all dirty state and starts logging. Writers that have not yet seen the flag
    /// may finish an unmarked write; the VM's start of logging kicks every vCPU (a
    /// synchronisation point) so that the migration's first pass reads those writes.
    pub fn start_logging(&self) {
        self.logging.store(false, SeqCst);
        {
            let _g = self.reap_lock.lock().unwrap_or_else(|e| e.into_inner());
            for ring in &self.rings {
                ring.reap(|_| {});
            }
        }
        self.dirty.clear_all();
        self.collected.clear_all();
        self.logging.store(true, SeqCst);
    }

    pub fn stop_logging(&self) {
        self.logging.store(false, SeqCst);
    }

    #[inline]
    pub fn is_logging(&self) -> bool {
        self.logging.load(Relaxed)
    }

    /// Marks `page` dirty after the writer stored its data. Returns true on a clean-to-dirty
    /// transition (the write fault KVM would count). Nothing happens while logging is off.
    #[inline]
    pub fn mark(&self, page: usize, writer: Writer) -> bool {
        if !self.is_logging() || !self.dirty.set(page) {
            return false;
        }
        if self.ring_mode() {
            let pushed = match writer {
                Writer::Vcpu(i) => self.rings[i].push(page as u64),
                Writer::Device => false,
            };
            if !pushed {
                // Device write, or a ring past its hard limit: the backup bitmap.
                self.collected.set(page);
            }
        }
        true
    }

    pub fn ring(&self, vcpu: usize) -> Option<&DirtyRing> {
        self.rings.get(vcpu)
    }

    /// Ring mode: empties every vCPU's ring into the collected set and re-protects those
    /// pages. Returns the entries reaped per vCPU (empty in bitmap mode).
    pub fn reap(&self) -> Vec<usize> {
        let _g = self.reap_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.rings
            .iter()
            .map(|ring| self.collect_ring(ring))
            .collect()
    }

    /// Ring mode: empties only `vcpu`'s ring, as QEMU reaps the exiting vCPU's ring alone at
    /// a ring-full exit while dirty-limit is in service (the other vCPUs keep their entries
    /// and so still fill their rings and take their own sleeps). Returns the entries reaped;
    /// None if there is no such ring (bitmap mode, or `vcpu` out of range).
    pub fn reap_vcpu(&self, vcpu: usize) -> Option<usize> {
        let ring = self.rings.get(vcpu)?;
        let _g = self.reap_lock.lock().unwrap_or_else(|e| e.into_inner());
        Some(self.collect_ring(ring))
    }

    /// Moves one ring's entries into the collected set. The caller holds the reap lock.
    fn collect_ring(&self, ring: &DirtyRing) -> usize {
        ring.reap(|page| {
            let page = page as usize;
            // Clear first (acquiring the writer's data), then publish.
            self.dirty.clear(page);
            self.collected.set(page);
        })
    }

    /// Atomically takes the dirty set: returns the dirty pages in ascending order and clears
    /// them, so pages written from now on show up in the next harvest.
    pub fn harvest(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        if self.ring_mode() {
            self.reap();
            self.collected.take(|p| {
                self.dirty.clear(p);
                pages.push(p as u64);
            });
        } else {
            self.dirty.take(|p| pages.push(p as u64));
        }
        pages
    }

    /// QEMU's manual dirty-log protect (KVM_CLEAR_DIRTY_LOG), bitmap mode: the dirty pages,
    /// left set. A set bit is a page not write-protected, so rewriting it is no fault: it is
    /// neither counted nor reported again until `clear_dirty` re-protects it, which the
    /// sender does just before the page's chunk goes out (so a write between the sync and
    /// the send is not sent twice). Ring mode re-protects at the reap: this is `harvest`.
    ///
    /// No lost update: `clear_dirty` clears with `AcqRel` before the page is read, so a write
    /// before it (whose `Release` mark found the bit set, still ordered before the clear in
    /// the word's modification order) is in the copy sent, and one after it sets the bit
    /// again for the next sync.
    pub fn harvest_lazy(&self) -> Vec<u64> {
        if self.ring_mode() {
            return self.harvest();
        }
        let mut pages = Vec::new();
        self.dirty.scan(|p| pages.push(p as u64));
        pages
    }

    /// Re-protects pages a `harvest_lazy` reported (bitmap mode; a no-op with rings).
    /// Out-of-range pages are an error.
    pub fn clear_dirty(&self, pages: &[u64]) -> Result<(), Error> {
        if self.ring_mode() {
            return Ok(());
        }
        if let Some(&page) = pages.iter().find(|&&p| p as usize >= self.pages()) {
            return Err(Error::PageOutOfRange {
                page,
                pages: self.pages(),
            });
        }
        self.dirty.clear_bits(pages);
        Ok(())
    }

    /// Pages dirty now, without clearing: what the next harvest would at least return.
    pub fn count(&self) -> usize {
        if self.ring_mode() {
            self.dirty.count_union(&self.collected)
        } else {
            self.dirty.count()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn lazy_harvest_leaves_pages_unprotected_until_cleared() {
        let t = DirtyTracker::new(200, TrackMode::Bitmap, 1).unwrap();
        t.start_logging();
        for p in [3, 64, 65, 130] {
            assert!(t.mark(p, Writer::Vcpu(0)));
        }
        assert_eq!(t.harvest_lazy(), vec![3, 64, 65, 130]);
        // Not re-protected: a rewrite is no new fault, and the page is still reported.
        assert!(!t.mark(64, Writer::Vcpu(0)));
        assert_eq!(t.harvest_lazy(), vec![3, 64, 65, 130]);
        t.clear_dirty(&[3, 64, 65]).unwrap();
        assert!(
            t.mark(64, Writer::Vcpu(0)),
            "re-protected: a write faults again"
        );
        assert_eq!(t.harvest_lazy(), vec![64, 130]);
        assert!(t.clear_dirty(&[200]).is_err());
        assert_eq!(t.harvest(), vec![64, 130]);
        assert!(t.harvest().is_empty());
    }

    /// A tracker with the smallest rings (256 entries, PML off: 192 to the soft limit).
    fn small_rings(pages: usize, vcpus: usize) -> DirtyTracker {
        DirtyTracker::new(
            pages,
            TrackMode::Ring {
                size: 256,
                pml: false,
            },
            vcpus,
        )
        .unwrap()
    }

    fn both_modes() -> [TrackMode; 2] {
        [
            TrackMode::Bitmap,
            TrackMode::Ring {
                size: 256,
                pml: false,
            },
        ]
    }

    #[test]
    fn no_marks_while_not_logging() {
        for mode in both_modes() {
            let t = DirtyTracker::new(100, mode, 1).unwrap();
            assert!(!t.mark(5, Writer::Vcpu(0)));
            t.start_logging();
            assert!(t.mark(5, Writer::Vcpu(0)));
            assert!(!t.mark(5, Writer::Vcpu(0)), "second write is no transition");
            assert_eq!(t.count(), 1);
            t.stop_logging();
            assert!(!t.mark(6, Writer::Vcpu(0)));
        }
    }

    #[test]
    fn harvest_takes_and_clears() {
        for mode in both_modes() {
            let t = DirtyTracker::new(1000, mode, 2).unwrap();
            t.start_logging();
            for p in [999, 3, 64, 65, 3] {
                t.mark(p, Writer::Vcpu(p % 2));
            }
            t.mark(500, Writer::Device);
            assert_eq!(t.harvest(), vec![3, 64, 65, 500, 999]);
            assert!(t.harvest().is_empty());
            assert!(t.mark(3, Writer::Vcpu(1)), "clean again after harvest");
            assert!(t.mark(500, Writer::Device), "device page clean again too");
            assert_eq!(t.harvest(), vec![3, 500]);
        }
    }

    #[test]
    fn ring_mode_pushes_transitions_and_reaps_per_vcpu() {
        let t = small_rings(1000, 2);
        t.start_logging();
        for p in 0..10 {
            t.mark(p, Writer::Vcpu(0));
            t.mark(p, Writer::Vcpu(1)); // already dirty: not pushed
        }
        t.mark(20, Writer::Vcpu(1));
        assert_eq!(t.ring(0).unwrap().len(), 10);
        assert_eq!(t.reap(), vec![10, 1]);
        assert_eq!(t.count(), 11);
        assert!(t.mark(0, Writer::Vcpu(1)), "reaped pages are re-protected");
        assert_eq!(t.harvest().len(), 11);
    }

    #[test]
    fn reap_vcpu_empties_only_that_ring() {
        let t = small_rings(100, 2);
        t.start_logging();
        for p in 0..5 {
            t.mark(p, Writer::Vcpu(0));
            t.mark(50 + p, Writer::Vcpu(1));
        }
        assert_eq!(t.reap_vcpu(1), Some(5));
        assert_eq!(
            t.ring(0).unwrap().len(),
            5,
            "vCPU 0's entries stay in its ring"
        );
        assert!(t.ring(1).unwrap().is_empty());
        assert!(t.mark(50, Writer::Vcpu(1)), "reaped pages are re-protected");
        assert!(!t.mark(0, Writer::Vcpu(1)), "unreaped pages stay dirty");
        assert_eq!(t.reap_vcpu(2), None);
        assert_eq!(
            t.harvest().len(),
            10,
            "the dirty sync still collects every ring"
        );
        let bitmap = DirtyTracker::new(100, TrackMode::Bitmap, 1).unwrap();
        assert_eq!(bitmap.reap_vcpu(0), None);
    }

    #[test]
    fn ring_overflow_falls_back_to_bitmap() {
        let t = small_rings(1000, 1);
        t.start_logging();
        for p in 0..300 {
            assert!(t.mark(p, Writer::Vcpu(0)));
        }
        assert_eq!(t.harvest(), (0..300).collect::<Vec<u64>>());
    }

    /// Writers store data then mark; a harvester repeatedly harvests and reads. Every page's
    /// final value must be observed by some harvest after the writers stop, and the union of
    /// the harvests must be exactly the written pages.
    #[test]
    fn concurrent_writers_lose_no_update() {
        use crate::memory::GuestMemory;
        for mode in both_modes() {
            let pages = 512;
            let mem = GuestMemory::new(pages, 4096).unwrap();
            let t = DirtyTracker::new(pages, mode, 2).unwrap();
            t.start_logging();
            let mut seen = vec![0u64; pages];
            let mut union = BTreeSet::new();
            let done = AtomicBool::new(false);
            std::thread::scope(|s| {
                let writers: Vec<_> = (0..2usize)
                    .map(|v| {
                        let (mem, t) = (&mem, &t);
                        s.spawn(move || {
                            for i in 1..=20_000u64 {
                                // vCPU v owns odd or even pages; value i is increasing.
                                let page = ((i * 7) as usize % (pages / 2)) * 2 + v;
                                mem.write_words(page, 0, 1, i);
                                if t.mark(page, Writer::Vcpu(v)) {
                                    if let Some(r) = t.ring(v) {
                                        while r.is_soft_full() {
                                            std::hint::spin_loop();
                                        }
                                    }
                                }
                            }
                        })
                    })
                    .collect();
                let harvester = s.spawn(|| {
                    while !done.load(SeqCst) {
                        for p in t.harvest() {
                            union.insert(p);
                            seen[p as usize] = mem.read_words(p as usize, 0, 1);
                        }
                    }
                });
                for w in writers {
                    w.join().unwrap();
                }
                done.store(true, SeqCst);
                harvester.join().unwrap();
            });
            for p in t.harvest() {
                union.insert(p);
                seen[p as usize] = mem.read_words(p as usize, 0, 1);
            }
            for (p, &last_seen) in seen.iter().enumerate() {
                let now = mem.read_words(p, 0, 1);
                assert_eq!(last_seen, now, "{mode:?}: page {p} lost its last write");
            }
            let written: BTreeSet<u64> = (0..pages as u64)
                .filter(|&p| mem.read_words(p as usize, 0, 1) != 0)
                .collect();
            assert_eq!(union, written, "{mode:?}");
        }
    }
}
