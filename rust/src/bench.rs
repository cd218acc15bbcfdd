//! Micro-benchmarks that need to run inside the binary: each measures the real operation and
//! its baseline in the same process, so `benches/` can report ratios.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Release};
use std::time::Instant;

use crate::tracker::{DirtyTracker, TrackMode, Writer};

/// Page order for both loops: a stride that touches every word, so neither loop gets to
/// hammer one cache line.
fn page_at(i: usize, pages: usize) -> usize {
    (i.wrapping_mul(64 + 1)) % pages
}

/// Marks per second through the tracker (bitmap mode, logging on), with the transition
/// counting a vCPU does. The log is cleared between passes so marks keep finding clean pages.
pub fn mark_rate(pages: usize, marks: usize) -> f64 {
    let tracker = DirtyTracker::new(pages, TrackMode::Bitmap, 1).expect("bitmap tracker");
    tracker.start_logging();
    let mut transitions = 0u64;
    let t = Instant::now();
    for i in 0..marks {
        if tracker.mark(page_at(i, pages), Writer::Vcpu(0)) {
            transitions += 1;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    black_box(transitions);
    marks as f64 / secs
}

/// The baseline: a plain `fetch_or` per page on an `AtomicU64` array.
pub fn fetch_or_rate(pages: usize, marks: usize) -> f64 {
    let words: Vec<AtomicU64> = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    let t = Instant::now();
    for i in 0..marks {
        let p = page_at(i, pages);
        black_box(words[p / 64].fetch_or(1 << (p % 64), Release));
    }
    marks as f64 / t.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_are_positive() {
        assert!(super::mark_rate(1 << 12, 10_000) > 0.0);
        assert!(super::fetch_or_rate(1 << 12, 10_000) > 0.0);
    }
}
