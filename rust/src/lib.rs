//! dqmig's core: guest memory, dirty tracking (bitmap and per-vCPU dirty rings), emulated
//! vCPUs with dirty-quota exits, and deterministic guest programs. Pure Rust; the PyO3
//! layer lives in `bindings` behind the `python` feature.

pub mod bench;
pub mod memory;
pub mod program;
pub mod ring;
pub mod stream;
pub mod tracker;
pub mod vcpu;

#[cfg(feature = "python")]
mod bindings;

use memory::GuestMemory;
use tracker::{DirtyTracker, TrackMode};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("page {page} is out of range: the guest has {pages} pages")]
    PageOutOfRange { page: u64, pages: usize },
    #[error("expected {expected} bytes, got {got}")]
    BadLength { expected: usize, got: usize },
}

/// A guest: its memory and the dirty tracker for it, shared by vCPUs, devices and the
/// migration through an `Arc`.
pub struct Guest {
    pub memory: GuestMemory,
    pub tracker: DirtyTracker,
    pub vcpus: usize,
}

impl Guest {
    pub fn new(
        pages: usize,
        page_size: usize,
        mode: TrackMode,
        vcpus: usize,
    ) -> Result<Self, Error> {
        if vcpus == 0 {
            return Err(Error::Config("a guest needs at least one vCPU".into()));
        }
        Ok(Self {
            memory: GuestMemory::new(pages, page_size)?,
            tracker: DirtyTracker::new(pages, mode, vcpus)?,
            vcpus,
        })
    }
}
