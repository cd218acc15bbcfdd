//! Micro-benchmarks that need to run inside the binary: each measures the real operation and
//! its baseline in the same process, so `benches/` can report ratios.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Release};
use std::time::Instant;

use crate::tracker::{DirtyTracker, TrackMode, Writer};

/// Both loops visit pages with a stride of 65 (every word, never the same cache line twice
/// in a row) and start each pass over `pages` marks with a clean log, so every mark finds a
/// clean page, as a vCPU's first write to a page after a harvest does.
struct Walk {
    p: usize,
    pages: usize,
}

impl Walk {
    #[inline]
    fn next(&mut self) -> usize {
        self.p += 65;
        if self.p >= self.pages {
            self.p -= self.pages;
        }
        self.p
    }
}

/// Times `marks` calls of `mark`, in passes of `pages`, calling `clean` (untimed) before each.
fn timed_passes(
    pages: usize,
    marks: usize,
    mut clean: impl FnMut(),
    mut mark: impl FnMut(usize) -> bool,
) -> f64 {
    let mut walk = Walk { p: 0, pages };
    let mut transitions = 0u64;
    let mut elapsed = 0.0;
    for pass in 0..marks.div_ceil(pages) {
        let n = pages.min(marks - pass * pages);
        clean();
        let t = Instant::now();
        for _ in 0..n {
            transitions += mark(walk.next()) as u64;
        }
        elapsed += t.elapsed().as_secs_f64();
    }
    black_box(transitions);
    marks as f64 / elapsed
}

/// Marks per second through the tracker (bitmap mode, logging on), with the transition test
/// a vCPU does.
pub fn mark_rate(pages: usize, marks: usize) -> f64 {
    let tracker = DirtyTracker::new(pages, TrackMode::Bitmap, 1).expect("bitmap tracker");
    tracker.start_logging();
    timed_passes(
        pages,
        marks,
        || drop(tracker.harvest()),
        |p| tracker.mark(p, Writer::Vcpu(0)),
    )
}

/// The baseline: a plain `fetch_or` per page on an `AtomicU64` array, testing the old bit
/// as marking does (so both compile to the same locked bit-set).
pub fn fetch_or_rate(pages: usize, marks: usize) -> f64 {
    let words: Vec<AtomicU64> = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    timed_passes(
        pages,
        marks,
        || words.iter().for_each(|w| w.store(0, Release)),
        |p| {
            let mask = 1u64 << (p % 64);
            words[p / 64].fetch_or(mask, Release) & mask == 0
        },
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_are_positive() {
        assert!(super::mark_rate(1 << 12, 10_000) > 0.0);
        assert!(super::fetch_or_rate(1 << 12, 10_000) > 0.0);
    }
}
