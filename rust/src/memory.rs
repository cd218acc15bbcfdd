//! Guest memory: one page-aligned anonymous mapping, accessed only through `AtomicU64` words.
//!
//! vCPU threads write pages while the migration sender reads them. Plain `&mut [u8]` access
//! from several threads would be a data race; relaxed atomic word accesses are not, and on
//! x86-64 they compile to the same plain `mov` instructions, so the guest pays nothing for
//! soundness. Ordering between data and dirty bits is the tracker's job (write, then mark
//! with `Release`; harvest with `Acquire`, then read).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use memmap2::MmapMut;
use xxhash_rust::xxh3::xxh3_64;

use crate::Error;

pub const DEFAULT_PAGE_SIZE: usize = 4096;
const WORD: usize = 8;
/// How many pages ahead a page walk prefetches (see `GuestMemory::prefetch_page`).
pub const PREFETCH_AHEAD: usize = 8;

/// N pages of real memory. Pages are numbered from 0.
pub struct GuestMemory {
    /// Owns the mapping; never accessed directly after `words` is built from it.
    _map: MmapMut,
    words: &'static [AtomicU64],
    page_size: usize,
    pages: usize,
    /// `/proc/self/pagemap`, to learn which pages the kernel never backed (None if absent).
    pagemap: Option<File>,
    host_page: usize,
}

/// pagemap entry bits: the page is in RAM / in swap.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
/// Longest run of guest pages one pagemap read covers, relative to the pages asked about.
const PAGEMAP_SPAN_FACTOR: usize = 4;

const _: () = assert!(std::mem::align_of::<AtomicU64>() == std::mem::align_of::<u64>());
const _: () = assert!(std::mem::size_of::<AtomicU64>() == WORD);

impl GuestMemory {
    /// Maps `pages * page_size` bytes of zeroed anonymous memory. The kernel backs pages
    /// lazily, so an untouched guest costs no resident memory.
    pub fn new(pages: usize, page_size: usize) -> Result<Self, Error> {
        if pages == 0 {
            return Err(Error::Config("guest memory needs at least one page".into()));
        }
        if !page_size.is_power_of_two() || !(4096..=1 << 30).contains(&page_size) {
            return Err(Error::Config(format!(
                "page size {page_size} must be a power of two between 4 KiB and 1 GiB"
            )));
        }
        let len = pages
            .checked_mul(page_size)
            .ok_or_else(|| Error::Config("guest memory size overflows".into()))?;
        let mut map = MmapMut::map_anon(len)
            .map_err(|e| Error::Config(format!("cannot map {len} bytes of guest memory: {e}")))?;
        // No transparent-huge-page hint: a sparse guest would then back 2 MiB for every
        // 4 KiB page it first writes (measured: 4 GiB of RSS for a 1 %-touched 4 GiB guest),
        // and never-backed pages are what makes zero pages free to migrate.
        let ptr = map.as_mut_ptr() as *const AtomicU64;
        // SAFETY: the mapping is page-aligned (so 8-byte aligned, and AtomicU64 has u64's
        // size and alignment, asserted above), zero-initialised (a valid AtomicU64 bit
        // pattern), and `len / 8` words long. It lives in `_map` as long as `self`, is never
        // moved (mmap memory does not move with the struct) and is never accessed other than
        // through this atomic slice, so no `&mut` alias exists. The `'static` lifetime never
        // escapes: `words()` reborrows it with the lifetime of `&self`.
        let words = unsafe { std::slice::from_raw_parts(ptr, len / WORD) };
        // SAFETY: sysconf has no preconditions.
        let host_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let pagemap = File::open("/proc/self/pagemap").ok();
        Ok(Self {
            _map: map,
            words,
            page_size,
            pages,
            pagemap,
            host_page,
        })
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn size(&self) -> usize {
        self.pages * self.page_size
    }

    pub fn words_per_page(&self) -> usize {
        self.page_size / WORD
    }

    /// Base address, for the read-only Python buffer view.
    pub fn as_ptr(&self) -> *const u8 {
        self.words.as_ptr() as *const u8
    }

    pub fn check_page(&self, page: u64) -> Result<usize, Error> {
        usize::try_from(page)
            .ok()
            .filter(|&p| p < self.pages)
            .ok_or(Error::PageOutOfRange {
                page,
                pages: self.pages,
            })
    }

    /// The words of one page. `page` must be in range (checked by callers on untrusted input).
    pub fn page_words(&self, page: usize) -> &[AtomicU64] {
        let wpp = self.words_per_page();
        &self.words[page * wpp..(page + 1) * wpp]
    }

    /// Stores `words` consecutive 8-byte values at `word_offset` in `page`: word i gets
    /// `value ^ i`. This is the guest's write; the caller marks the page afterwards.
    #[inline]
    pub fn write_words(&self, page: usize, word_offset: usize, words: usize, value: u64) {
        let page_words = self.page_words(page);
        for (i, w) in page_words[word_offset..word_offset + words]
            .iter()
            .enumerate()
        {
            w.store(value ^ i as u64, Relaxed);
        }
    }

    /// Folds `words` words at `word_offset` of `page` into one value (the guest's read).
    #[inline]
    pub fn read_words(&self, page: usize, word_offset: usize, words: usize) -> u64 {
        self.page_words(page)[word_offset..word_offset + words]
            .iter()
            .fold(0u64, |acc, w| acc.rotate_left(5) ^ w.load(Relaxed))
    }

    /// Starts loading the first cache line of `page`, if it exists. Walking pages one after
    /// another, each page's first load otherwise stalls on a TLB and cache miss (a nested
    /// page walk in a VM) that the hardware prefetcher does not cross a page boundary to
    /// hide. Only a hint: it never faults, and does nothing off x86-64.
    #[inline]
    pub fn prefetch_page(&self, page: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Some(word) = self.words.get(page.saturating_mul(self.words_per_page())) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: SSE is part of the x86-64 baseline, so the instruction exists on every
            // x86-64 CPU; a prefetch is a cache hint that never faults and changes no
            // memory (the address is inside the mapping anyway).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(word.as_ptr() as *const i8) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = page;
    }

    /// Copies one page into `out` (which must be `page_size` bytes).
    pub fn read_page_into(&self, page: usize, out: &mut [u8]) {
        for (chunk, w) in out.chunks_exact_mut(WORD).zip(self.page_words(page)) {
            chunk.copy_from_slice(&w.load(Relaxed).to_le_bytes());
        }
    }

    pub fn read_page(&self, page: u64) -> Result<Vec<u8>, Error> {
        let page = self.check_page(page)?;
        let mut out = vec![0u8; self.page_size];
        self.read_page_into(page, &mut out);
        Ok(out)
    }

    /// Overwrites one page with `data` (exactly `page_size` bytes). Not marked dirty: this is
    /// how a destination or a test loads memory, not a guest write.
    pub fn write_page(&self, page: u64, data: &[u8]) -> Result<(), Error> {
        let page = self.check_page(page)?;
        if data.len() != self.page_size {
            return Err(Error::BadLength {
                expected: self.page_size,
                got: data.len(),
            });
        }
        for (chunk, w) in data.chunks_exact(WORD).zip(self.page_words(page)) {
            w.store(
                u64::from_le_bytes(chunk.try_into().expect("8-byte chunk")),
                Relaxed,
            );
        }
        Ok(())
    }

    /// Writes pages `first..first + count` with non-zero data, a pattern of each page's
    /// number: a guest that has used that memory before migrating (its pages are sent
    /// whole, not as zero pages). Not marked dirty: it is the guest's state at boot.
    pub fn fill(&self, first: u64, count: u64) -> Result<(), Error> {
        if count == 0 {
            return Ok(());
        }
        let first = self.check_page(first)?;
        let last = self.check_page(first as u64 + count - 1)?;
        for page in first..=last {
            let seed = (page as u64 + 1).wrapping_mul(crate::program::GOLDEN);
            for (i, w) in self.page_words(page).iter().enumerate() {
                w.store((seed ^ ((i as u64) << 1)) | 1, Relaxed);
            }
        }
        Ok(())
    }

    /// For each of `pages` (ascending), true if the kernel has never backed it: neither in
    /// RAM nor in swap, so it reads as zero without being touched. False means unknown.
    /// Reading a never-touched page costs a page fault; this asks the page tables instead.
    pub fn unbacked(&self, pages: &[u64]) -> Vec<bool> {
        let mut out = vec![false; pages.len()];
        let (Some(pm), Some(&first), Some(&last)) = (&self.pagemap, pages.first(), pages.last())
        else {
            return out;
        };
        // Only ascending, in-range, dense lists: scattered dirty pages are backed anyway.
        if !pages.windows(2).all(|w| w[0] <= w[1]) || last as usize >= self.pages {
            return out;
        }
        let span = (last - first + 1) as usize;
        if span > pages.len() * PAGEMAP_SPAN_FACTOR {
            return out;
        }
        let per_page = (self.page_size / self.host_page).max(1);
        // mincore first: a resident page is backed, and asking costs about 2 ns a page
        // against about 40 ns for a pagemap entry. Only a page it calls non-resident (never
        // backed, or swapped out: mincore cannot tell which) needs the pagemap.
        let resident = self.resident(first as usize, span);
        if let Some(r) = &resident {
            if pages.iter().all(|&p| r[(p - first) as usize]) {
                return out;
            }
        }
        let base = self.as_ptr() as usize / self.host_page + first as usize * per_page;
        let mut raw = vec![0u8; span * per_page * 8];
        if pm.read_exact_at(&mut raw, (base * 8) as u64).is_err() {
            return out;
        }
        let entry =
            |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        for (o, &p) in out.iter_mut().zip(pages) {
            if resident.as_ref().is_some_and(|r| r[(p - first) as usize]) {
                continue;
            }
            let start = (p - first) as usize * per_page;
            *o = (start..start + per_page).all(|i| entry(i) & (PM_PRESENT | PM_SWAPPED) == 0);
        }
        out
    }

    /// For guest pages `first..first + n`: true if any of its host pages is resident (so it
    /// is backed). None if mincore fails. The range must be in the mapping.
    fn resident(&self, first: usize, n: usize) -> Option<Vec<bool>> {
        let per_page = (self.page_size / self.host_page).max(1);
        let mut vec = vec![0u8; n * per_page];
        // SAFETY: the range lies inside this mapping, which `self` keeps alive (callers check
        // `first + n <= pages`), so `add` stays in bounds. mincore only writes `vec`, one
        // byte per host page of the range: at most `n * per_page` bytes, what `vec` holds
        // (a guest page smaller than a host page gives an unaligned address, and mincore
        // fails with EINVAL without writing).
        let rc = unsafe {
            libc::mincore(
                self.as_ptr().add(first * self.page_size) as *mut libc::c_void,
                n * self.page_size,
                vec.as_mut_ptr(),
            )
        };
        (rc == 0).then(|| {
            vec.chunks_exact(per_page)
                .map(|h| h.iter().any(|&b| b & 1 != 0))
                .collect()
        })
    }

    pub fn is_zero_page(&self, page: usize) -> bool {
        self.page_words(page).iter().all(|w| w.load(Relaxed) == 0)
    }

    /// xxh3-64 of one page's bytes.
    pub fn page_digest(&self, page: u64) -> Result<u64, Error> {
        let page = self.check_page(page)?;
        let mut buf = vec![0u8; self.page_size];
        self.read_page_into(page, &mut buf);
        Ok(xxh3_64(&buf))
    }

    /// The memory digest: xxh3-64 over every page's xxh3-64, in page order. Equal memories
    /// give equal digests whatever their history. Pages are hashed on up to `threads`
    /// threads; pages the kernel never backed hash as zero pages without being touched.
    /// Taken while vCPUs write, it digests some mix of states.
    pub fn digest(&self) -> u64 {
        self.digest_with(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn digest_with(&self, threads: usize) -> u64 {
        let zero_digest = xxh3_64(&vec![0u8; self.page_size]);
        let mut digests = vec![0u64; self.pages];
        let per_thread = self.pages.div_ceil(threads.max(1));
        std::thread::scope(|s| {
            for (t, out) in digests.chunks_mut(per_thread).enumerate() {
                s.spawn(move || self.page_digests_into(t * per_thread, out, zero_digest));
            }
        });
        let bytes: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
        xxh3_64(&bytes)
    }

    /// Digests of pages `first..first + out.len()`.
    fn page_digests_into(&self, first: usize, out: &mut [u64], zero_digest: u64) {
        const CHUNK: usize = 512;
        let mut buf = vec![0u8; self.page_size];
        for (c, out) in out.chunks_mut(CHUNK).enumerate() {
            let start = first + c * CHUNK;
            let pages: Vec<u64> = (start as u64..(start + out.len()) as u64).collect();
            for ((d, page), unbacked) in out.iter_mut().zip(start..).zip(self.unbacked(&pages)) {
                *d = if unbacked {
                    zero_digest
                } else {
                    self.read_page_into(page, &mut buf);
                    xxh3_64(&buf)
                };
            }
        }
    }

    /// Backs every page now (QEMU's -mem-prealloc), so receiving a migration does not pay
    /// a page fault per page. Returns false if the kernel could not populate the mapping.
    pub fn prealloc(&self) -> bool {
        // SAFETY: the range is exactly this mapping, which `self` keeps alive.
        // MADV_POPULATE_WRITE only faults pages in (zero-filled, as they already read); it
        // changes no byte of memory.
        let rc = unsafe {
            libc::madvise(
                self.as_ptr() as *mut libc::c_void,
                self.size(),
                libc::MADV_POPULATE_WRITE,
            )
        };
        rc == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_writes_nonzero_distinct_pages_in_range_only() {
        let m = GuestMemory::new(16, 4096).unwrap();
        m.fill(2, 5).unwrap();
        assert!((0..2).chain(7..16).all(|p| m.is_zero_page(p)));
        assert!((2..7).all(|p| m.page_words(p).iter().all(|w| w.load(Relaxed) != 0)));
        let digests: std::collections::HashSet<u64> =
            (2..7).map(|p| m.page_digest(p).unwrap()).collect();
        assert_eq!(digests.len(), 5, "each page its own data");
        assert!(m.fill(15, 2).is_err(), "past the end");
        m.fill(16, 0).unwrap();
    }

    #[test]
    fn new_memory_is_zero_and_sized() {
        let m = GuestMemory::new(16, 4096).unwrap();
        assert_eq!(m.size(), 16 * 4096);
        assert!((0..16).all(|p| m.is_zero_page(p)));
        assert_eq!(m.as_ptr() as usize % 4096, 0, "page aligned");
    }

    #[test]
    fn digest_is_thread_count_independent_and_sees_every_page() {
        let m = GuestMemory::new(1500, 4096).unwrap();
        let empty = m.digest_with(1);
        m.write_words(1499, 511, 1, 1);
        let one = m.digest_with(1);
        assert_ne!(one, empty, "last word of last page counts");
        assert_eq!(m.digest_with(3), one);
        assert!(m.prealloc());
        assert_eq!(m.digest_with(2), one, "prealloc changes no byte");
    }

    #[test]
    fn untouched_pages_are_unbacked() {
        let m = GuestMemory::new(64, 4096).unwrap();
        m.write_words(3, 0, 1, 7);
        let pages: Vec<u64> = (0..8).collect();
        let unbacked = m.unbacked(&pages);
        assert!(!unbacked[3], "a written page is backed");
        if m.pagemap.is_some() {
            assert!(unbacked[5], "an untouched page is not");
        }
        assert!(
            m.unbacked(&[0, 63]).iter().all(|&u| !u),
            "scattered: unknown"
        );
    }

    #[test]
    fn resident_pages_skip_the_pagemap_and_agree_with_it() {
        let m = GuestMemory::new(64, 4096).unwrap();
        for p in 0..32 {
            m.write_words(p, 0, 1, 1);
        }
        let r = m.resident(0, 64).expect("mincore works on the mapping");
        assert!(r[..32].iter().all(|&b| b), "written pages are resident");
        assert!(r[32..].iter().all(|&b| !b), "untouched pages are not");
        let dense: Vec<u64> = (0..32).collect();
        assert!(
            m.unbacked(&dense).iter().all(|&u| !u),
            "all resident: none unbacked"
        );
        let mixed: Vec<u64> = (28..40).collect();
        let u = m.unbacked(&mixed);
        assert!(u[..4].iter().all(|&u| !u));
        if m.pagemap.is_some() {
            assert!(
                u[4..].iter().all(|&u| u),
                "the pagemap decides the non-resident ones"
            );
        }
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(GuestMemory::new(0, 4096).is_err());
        assert!(GuestMemory::new(4, 1000).is_err());
        assert!(GuestMemory::new(4, 2048).is_err());
    }

    #[test]
    fn page_roundtrip_and_digest() {
        let m = GuestMemory::new(4, 4096).unwrap();
        let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        let empty = m.digest();
        m.write_page(2, &data).unwrap();
        assert_eq!(m.read_page(2).unwrap(), data);
        assert_eq!(m.page_digest(2).unwrap(), xxh3_64(&data));
        assert_ne!(m.digest(), empty);
        assert!(!m.is_zero_page(2));
        assert!(m.write_page(4, &data).is_err());
        assert!(m.write_page(1, &data[..10]).is_err());
        assert!(m.read_page(99).is_err());
    }

    #[test]
    fn write_words_then_read_words() {
        let m = GuestMemory::new(2, 4096).unwrap();
        m.write_words(1, 4, 3, 0xabc);
        let page = m.read_page(1).unwrap();
        assert_eq!(u64::from_le_bytes(page[32..40].try_into().unwrap()), 0xabc);
        assert_eq!(
            u64::from_le_bytes(page[40..48].try_into().unwrap()),
            0xabc ^ 1
        );
        assert_ne!(m.read_words(1, 4, 3), 0);
    }

    #[test]
    fn concurrent_writers_and_reader() {
        let m = GuestMemory::new(64, 4096).unwrap();
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let m = &m;
                s.spawn(move || {
                    for i in 0..10_000u64 {
                        let page = ((i * 2 + t) % 64) as usize;
                        m.write_words(page, 0, 512, i + 1);
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..50 {
                    let _ = m.digest();
                }
            });
        });
        assert!((0..64).all(|p| !m.is_zero_page(p)));
    }
}
