//! Deterministic, seeded guest programs. A program is a sequence of memory accesses; the
//! same spec, seed and step count always produce the same accesses and the same bytes, so a
//! guest paused here can resume on another host from its exported state and end identical.

use serde::{Deserialize, Serialize};

use crate::Error;

/// What the guest does on each step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Workload {
    /// Halts: never touches memory.
    Idle,
    /// Writes its region's pages in order, wrapping around.
    Sequential,
    /// Writes pages drawn uniformly from its region.
    Uniform,
    /// Writes the first `hot_fraction` of its region with probability `hot_probability`,
    /// the rest otherwise.
    HotCold {
        hot_fraction: f64,
        hot_probability: f64,
    },
    /// Reads a random page and computes; a `write_share` of steps write instead.
    ReadMostly { write_share: f64, compute: u32 },
    /// QEMU guestperf's stress: every 8-byte word of every page of the region, in order.
    Stress,
}

/// A program: a workload over a region of guest memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgramSpec {
    #[serde(flatten)]
    pub workload: Workload,
    /// First page of the region.
    #[serde(default)]
    pub region_start: u64,
    /// Pages in the region (0 = from `region_start` to the end of memory).
    #[serde(default)]
    pub region_pages: u64,
    /// Bytes per write (a multiple of 8, at most a page). Stress always writes whole pages.
    #[serde(default = "default_write_size")]
    pub write_size: u64,
    /// Open-loop rate limit in steps per second; 0 = flat out.
    #[serde(default)]
    pub rate: f64,
    #[serde(default)]
    pub seed: u64,
    /// Stop after this many steps (the `done` exit); 0 = run forever.
    #[serde(default)]
    pub steps: u64,
}

fn default_write_size() -> u64 {
    8
}

/// Rate limits a program can keep: the slowest waits 1000 s between steps (a token wait is
/// a `Duration`), the fastest is beyond any host's flat-out pace.
pub const MIN_RATE: f64 = 1e-3;
pub const MAX_RATE: f64 = 1e12;
/// Compute rotations per read-mostly step: at most about a millisecond, since a kick (a
/// pause, the switchover's stop) is seen between steps.
pub const MAX_COMPUTE: u32 = 1 << 20;

impl ProgramSpec {
    pub fn idle() -> Self {
        Self::new(Workload::Idle)
    }

    pub fn new(workload: Workload) -> Self {
        Self {
            workload,
            region_start: 0,
            region_pages: 0,
            write_size: 8,
            rate: 0.0,
            seed: 0,
            steps: 0,
        }
    }

    /// Checks the spec against a memory of `pages` pages of `page_size` bytes and fills in a
    /// whole-memory region.
    pub fn validated(mut self, pages: u64, page_size: u64) -> Result<Self, Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.region_start >= pages {
            return bad(format!(
                "region_start {} is beyond the guest's {pages} pages",
                self.region_start
            ));
        }
        if self.region_pages == 0 {
            self.region_pages = pages - self.region_start;
        }
        if self.region_pages > pages - self.region_start {
            return bad(format!(
                "region {}+{} pages exceeds the guest's {pages} pages",
                self.region_start, self.region_pages
            ));
        }
        if self.write_size == 0 || self.write_size % 8 != 0 || self.write_size > page_size {
            return bad(format!(
                "write_size {} must be a multiple of 8 bytes, at most the page size {page_size}",
                self.write_size
            ));
        }
        if !(self.rate == 0.0 || (MIN_RATE..=MAX_RATE).contains(&self.rate)) {
            return bad(format!(
                "rate {:?} must be 0 (flat out) or between {MIN_RATE} and {MAX_RATE:e} steps/s",
                self.rate
            ));
        }
        match self.workload {
            Workload::HotCold {
                hot_fraction,
                hot_probability,
            } => {
                if !(hot_fraction > 0.0 && hot_fraction <= 1.0) {
                    return bad(format!("hot_fraction {hot_fraction} must be in (0, 1]"));
                }
                if !(0.0..=1.0).contains(&hot_probability) {
                    return bad(format!(
                        "hot_probability {hot_probability} must be in [0, 1]"
                    ));
                }
            }
            Workload::ReadMostly { write_share, .. } if !(0.0..=1.0).contains(&write_share) => {
                return bad(format!("write_share {write_share} must be in [0, 1]"));
            }
            Workload::ReadMostly { compute, .. } if compute > MAX_COMPUTE => {
                return bad(format!(
                    "compute {compute} must be at most {MAX_COMPUTE} per step"
                ));
            }
            _ => {}
        }
        Ok(self)
    }
}

/// One step's memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub page: usize,
    pub word_offset: usize,
    pub words: usize,
    pub write: bool,
    /// The value written (word i gets `value ^ i`).
    pub value: u64,
}

/// A program and where it is. Serialised whole (spec included) for migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub spec: ProgramSpec,
    /// Sequential/stress cursor within the region.
    pub position: u64,
    /// SplitMix64 state.
    pub rng: u64,
    /// Steps completed.
    pub progress: u64,
}

pub(crate) const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Program {
    /// `spec` must already be validated.
    pub fn new(spec: ProgramSpec) -> Self {
        let rng = spec.seed ^ 0x6471_6d69_6700_0000;
        Self {
            spec,
            position: 0,
            rng,
            progress: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.spec.workload == Workload::Idle
    }

    pub fn is_stress(&self) -> bool {
        self.spec.workload == Workload::Stress
    }

    pub fn is_done(&self) -> bool {
        self.spec.steps != 0 && self.progress >= self.spec.steps
    }

    /// Compute iterations per step (read-mostly programs).
    pub fn compute(&self) -> u32 {
        match self.spec.workload {
            Workload::ReadMostly { compute, .. } => compute,
            _ => 0,
        }
    }

    fn uniform(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift: unbiased enough for a workload and branch-free.
        ((splitmix64(&mut self.rng) as u128 * n as u128) >> 64) as u64
    }

    fn chance(&mut self, p: f64) -> bool {
        (splitmix64(&mut self.rng) >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < p
    }

    /// The next step's access (None for idle), advancing the cursor and the PRNG. The caller
    /// performs it and then calls `complete`.
    pub fn next_access(&mut self, words_per_page: usize) -> Option<Access> {
        let n = self.spec.region_pages;
        let words = (self.spec.write_size / 8) as usize;
        let slots = (words_per_page / words) as u64;
        let (page, write, whole_page) = match self.spec.workload {
            Workload::Idle => return None,
            Workload::Stress | Workload::Sequential => {
                let p = self.position;
                self.position = (self.position + 1) % n;
                (p, true, self.is_stress())
            }
            Workload::Uniform => (self.uniform(n), true, false),
            Workload::HotCold {
                hot_fraction,
                hot_probability,
            } => {
                let hot = ((n as f64 * hot_fraction).ceil() as u64).clamp(1, n);
                let p = if hot == n || self.chance(hot_probability) {
                    self.uniform(hot)
                } else {
                    hot + self.uniform(n - hot)
                };
                (p, true, false)
            }
            Workload::ReadMostly { write_share, .. } => {
                let p = self.uniform(n);
                (p, self.chance(write_share), false)
            }
        };
        let mut value_state = self.spec.seed ^ self.progress.wrapping_mul(GOLDEN);
        let value = splitmix64(&mut value_state);
        let (word_offset, words) = if whole_page {
            (0, words_per_page)
        } else if matches!(self.spec.workload, Workload::Sequential) {
            (0, words)
        } else {
            (self.uniform(slots) as usize * words, words)
        };
        Some(Access {
            page: (self.spec.region_start + page) as usize,
            word_offset,
            words,
            write,
            value,
        })
    }

    /// Where the program is, to undo a `next_access` whose step did not run.
    pub fn cursor(&self) -> (u64, u64) {
        (self.position, self.rng)
    }

    pub fn rewind(&mut self, cursor: (u64, u64)) {
        (self.position, self.rng) = cursor;
    }

    pub fn complete(&mut self) {
        self.progress += 1;
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("program state serialises")
    }

    /// Parses an exported state and checks it against this guest's memory.
    pub fn from_json(json: &str, pages: u64, page_size: u64) -> Result<Self, Error> {
        let mut program: Program = serde_json::from_str(json)
            .map_err(|e| Error::Config(format!("bad program state: {e}")))?;
        program.spec = program.spec.validated(pages, page_size)?;
        if program.position >= program.spec.region_pages {
            return Err(Error::Config(format!(
                "program position {} is outside its region of {} pages",
                program.position, program.spec.region_pages
            )));
        }
        Ok(program)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(workload: Workload) -> ProgramSpec {
        ProgramSpec {
            seed: 7,
            ..ProgramSpec::new(workload)
        }
        .validated(100, 4096)
        .unwrap()
    }

    fn accesses(p: &mut Program, n: usize) -> Vec<Access> {
        (0..n)
            .map(|_| {
                let a = p.next_access(512).unwrap();
                p.complete();
                a
            })
            .collect()
    }

    #[test]
    fn same_seed_same_accesses() {
        let kinds = [
            Workload::Uniform,
            Workload::Sequential,
            Workload::Stress,
            Workload::HotCold {
                hot_fraction: 0.1,
                hot_probability: 0.9,
            },
            Workload::ReadMostly {
                write_share: 0.1,
                compute: 10,
            },
        ];
        for w in kinds {
            let a = accesses(&mut Program::new(spec(w.clone())), 500);
            let b = accesses(&mut Program::new(spec(w)), 500);
            assert_eq!(a, b);
            assert!(a
                .iter()
                .all(|x| x.page < 100 && x.word_offset + x.words <= 512));
        }
    }

    #[test]
    fn export_import_resumes_identically() {
        let mut p = Program::new(spec(Workload::Uniform));
        accesses(&mut p, 123);
        let mut q = Program::from_json(&p.to_json(), 100, 4096).unwrap();
        assert_eq!(accesses(&mut p, 200), accesses(&mut q, 200));
        assert_eq!(q.progress, 323);
    }

    #[test]
    fn import_rejects_bad_state() {
        assert!(Program::from_json("{", 100, 4096).is_err());
        let mut p = Program::new(spec(Workload::Sequential));
        p.position = 100;
        assert!(Program::from_json(&p.to_json(), 100, 4096).is_err());
        let p = Program::new(spec(Workload::Sequential));
        assert!(
            Program::from_json(&p.to_json(), 50, 4096).is_err(),
            "region beyond memory"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let err = |s: ProgramSpec| s.validated(100, 4096).unwrap_err().to_string();
        let base = ProgramSpec::new(Workload::Uniform);
        assert!(err(ProgramSpec {
            region_start: 100,
            ..base.clone()
        })
        .contains("region_start"));
        assert!(err(ProgramSpec {
            write_size: 12,
            ..base.clone()
        })
        .contains("write_size"));
        for rate in [-1.0, 1e-20, f64::NAN, f64::INFINITY, 1e13] {
            assert!(err(ProgramSpec {
                rate,
                ..base.clone()
            })
            .contains("rate"));
        }
        let heavy = Workload::ReadMostly {
            write_share: 0.0,
            compute: u32::MAX,
        };
        assert!(err(ProgramSpec::new(heavy)).contains("compute 4294967295"));
        let hc = Workload::HotCold {
            hot_fraction: 0.0,
            hot_probability: 0.5,
        };
        assert!(err(ProgramSpec::new(hc)).contains("hot_fraction"));
    }

    #[test]
    fn hot_cold_prefers_hot_pages() {
        let w = Workload::HotCold {
            hot_fraction: 0.1,
            hot_probability: 0.9,
        };
        let a = accesses(&mut Program::new(spec(w)), 10_000);
        let hot = a.iter().filter(|x| x.page < 10).count();
        assert!((8500..9500).contains(&hot), "{hot}");
    }

    #[test]
    fn stress_writes_whole_pages_in_order() {
        let a = accesses(&mut Program::new(spec(Workload::Stress)), 101);
        assert!(a
            .iter()
            .all(|x| x.words == 512 && x.word_offset == 0 && x.write));
        assert_eq!(a[99].page, 99);
        assert_eq!(a[100].page, 0);
    }

    #[test]
    fn read_mostly_write_share() {
        let w = Workload::ReadMostly {
            write_share: 0.05,
            compute: 0,
        };
        let a = accesses(&mut Program::new(spec(w)), 20_000);
        let writes = a.iter().filter(|x| x.write).count();
        assert!((800..1200).contains(&writes), "{writes}");
    }
}
