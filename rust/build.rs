//! Records which commit the extension is built from, so results can name it when dqmig is
//! installed (`pip install .`) rather than run from its checkout: the commit, whether the
//! Rust sources had local changes, and the commit's tree of Python files (blob ids), which
//! the installed package compares itself with at run time (dqmig/provenance.py). Python
//! edits therefore need no rebuild to be noticed; a new commit rebuilds the extension.
//! Without git, or when the crate is not the top of a checkout (an sdist, a copy), it
//! records nothing and `_native.build_commit()` returns None.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the Rust build inputs are; a local change here makes the build "dirty".
const RUST_INPUTS: [&str; 3] = ["rust", "Cargo.toml", "Cargo.lock"];

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    // --no-optional-locks: `status` must not refresh the index behind our back.
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .arg("--no-optional-locks")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The checkout's commit, if `dir` is the top of one (not a folder inside another repository).
fn commit(dir: &Path) -> Option<String> {
    let top = PathBuf::from(git(dir, &["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    git(dir, &["rev-parse", "--verify", "HEAD"]).filter(|c| !c.is_empty())
}

fn git_path(dir: &Path, name: &str) -> Option<PathBuf> {
    git(dir, &["rev-parse", "--git-path", name]).map(|p| dir.join(p))
}

/// Reruns this script when HEAD moves (a commit, a checkout) or a Rust input changes.
fn watch(dir: &Path) {
    let mut paths: Vec<PathBuf> = ["HEAD", "logs/HEAD", "packed-refs"]
        .iter()
        .filter_map(|p| git_path(dir, p))
        .collect();
    if let Some(r) = git(dir, &["symbolic-ref", "-q", "HEAD"]).and_then(|r| git_path(dir, &r)) {
        // A packed ref has no file yet: its folder changes when the branch moves.
        paths.extend(if r.exists() {
            Some(r)
        } else {
            r.parent().map(Path::to_path_buf)
        });
    }
    paths.extend(RUST_INPUTS.iter().map(|p| dir.join(p)));
    // A path that does not exist would make cargo rerun this script on every build.
    for p in paths.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=rust/build.rs");
    let commit = commit(&dir);
    let (mut dirty, mut tree) = ("", String::new());
    if let Some(c) = &commit {
        watch(&dir);
        let mut status = vec!["status", "--porcelain", "--untracked-files=no", "--"];
        status.extend(RUST_INPUTS);
        dirty = match git(&dir, &status) {
            Some(s) if s.is_empty() => "0",
            Some(_) => "1",
            None => "",
        };
        tree = git(&dir, &["ls-tree", "-r", c, "--", "python"]).unwrap_or_default();
    }
    std::fs::write(out.join("python-tree.txt"), tree).expect("write OUT_DIR/python-tree.txt");
    println!(
        "cargo:rustc-env=DQMIG_BUILD_COMMIT={}",
        commit.unwrap_or_default()
    );
    println!("cargo:rustc-env=DQMIG_BUILD_RUST_DIRTY={dirty}");
}
