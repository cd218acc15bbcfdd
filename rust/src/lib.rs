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

/// What rust/build.rs recorded of the checkout this crate was built from: the commit,
/// whether its Rust inputs had local changes (None if unknown), and the commit's
/// `git ls-tree -r` listing of python/. None when it was not built from a checkout.
pub fn build_commit() -> Option<(&'static str, Option<bool>, &'static str)> {
    let dirty = match env!("DQMIG_BUILD_RUST_DIRTY") {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    };
    let tree = include_str!(concat!(env!("OUT_DIR"), "/python-tree.txt"));
    let commit = env!("DQMIG_BUILD_COMMIT");
    (!commit.is_empty()).then_some((commit, dirty, tree))
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

#[cfg(test)]
mod tests {
    #[test]
    fn build_commit_is_a_full_hash_with_the_python_tree_or_none() {
        if let Some((commit, _, tree)) = super::build_commit() {
            assert_eq!(commit.len(), 40);
            assert!(commit.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(tree.contains("\tpython/dqmig/__init__.py"), "{tree}");
        }
    }
}
