//! What the fused flex kernels (`ops/attention/`, `ops/norm.rs`, `ops/gelu.rs`) share: operand
//! access, a single-threaded tile GEMM on the `gemm` crate, a vectorisable `exp` for non-positive arguments, lane-wise reductions, and the hashed
//! attention-dropout mask that a backward regenerates.

use burn::backend::flex::FlexTensor;
use gemm::{Parallelism, gemm};

/// Dropout of attention weights: a keep/drop decision per element of the (flattened) weight
/// array from a hash of its index, so a backward can regenerate the mask.
#[derive(Clone, Copy)]
pub(crate) struct Dropout {
    /// Drop when the element's 32-bit hash is below this.
    threshold: u32,
    /// `1 / (1 − p)`.
    scale: f32,
    /// Added (times an odd constant) to each element's 64-bit index before mixing.
    offset: u64,
}

impl Dropout {
    pub(crate) fn new(p: f32, seed: u32) -> Self {
        assert!(
            (0.0..1.0).contains(&p),
            "attention dropout {p} not in [0, 1)"
        );
        Self {
            threshold: (f64::from(p) * 4_294_967_296.0).min(4_294_967_295.0) as u32,
            scale: 1.0 / (1.0 - p),
            offset: mix(u64::from(seed) ^ 0x5151_7a5e_ed00_0000),
        }
    }

    /// `weights ← weights ∘ mask · scale`, where `weights[j]` is element `base + j` of the
    /// operation's (flattened) weight array: its mask bit depends on that index alone.
    pub(crate) fn apply_at(&self, weights: &mut [f32], base: u64) {
        if self.threshold == 0 {
            return;
        }
        for (j, w) in weights.iter_mut().enumerate() {
            let bits = (mix(self.offset.wrapping_add(base + j as u64)) >> 32) as u32;
            *w = if bits >= self.threshold {
                *w * self.scale
            } else {
                0.0
            };
        }
    }
}

/// The SplitMix64 finaliser: a bijective 64-bit mix, consecutive inputs giving unrelated
/// outputs.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A contiguous f32 tensor's elements.
pub(crate) fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice().expect("contiguous f32")
}

/// `dst[m, n] (= dst +) lhs[m, k] · rhs[k, n]`, each operand given by its row and column
/// strides (in elements), single-threaded (the callers parallelise over tiles).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds of every operand, so that the unchecked GEMM below stays inside the slices.
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst_rs, 1) < dst.len());
    if k > 0 {
        assert!(last(m, k, lhs_rs, lhs_cs) < lhs.len());
        assert!(last(k, n, rhs_rs, rhs_cs) < rhs.len());
    }
    // SAFETY: the asserts above keep every element the GEMM touches inside the three slices,
    // `dst` is borrowed mutably and does not alias `lhs` or `rhs`, and `k = 0` reads neither.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `exp(x)` for `x <= 0` (clamped below at −87, where it is ~1.6e-38) to within ~2 ulp: a
/// branch-free Cody–Waite reduction and a degree-6 polynomial, so loops over slices vectorise.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to integer
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO; // |r| <= ln2 / 2
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A reduction of `x` from `init` over eight interleaved lanes, then across them.
#[inline(always)]
pub(crate) fn lanes(x: &[f32], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &b| op(a, b));
    for chunk in chunks {
        for (a, &b) in acc.iter_mut().zip(chunk) {
            *a = op(*a, b);
        }
    }
    acc.iter().fold(tail, |a, &b| op(a, b))
}

/// A small process-wide cache of values built from a key (index and mask tensors, DFT
/// matrices, ...): built once, cloned out afterwards; the least recently used entry goes when
/// `capacity` is reached. For statics: `static CACHE: Memo<K, V> = Memo::new(8);`.
pub(crate) struct Memo<K, V> {
    entries: std::sync::Mutex<Vec<(K, V)>>,
    capacity: usize,
}

impl<K: PartialEq, V: Clone> Memo<K, V> {
    /// An empty cache keeping at most `capacity` entries (at least one).
    pub(crate) const fn new(capacity: usize) -> Self {
        Self {
            entries: std::sync::Mutex::new(Vec::new()),
            capacity: if capacity == 0 { 1 } else { capacity },
        }
    }

    /// The value of `key`, built by `build` the first time (the lock is held while building,
    /// so concurrent callers build it once).
    pub(crate) fn get_or_build(&self, key: K, build: impl FnOnce() -> V) -> V {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(i) = entries.iter().position(|(k, _)| *k == key) {
            let entry = entries.remove(i);
            let value = entry.1.clone();
            entries.push(entry); // most recently used last
            return value;
        }
        let value = build();
        if entries.len() == self.capacity {
            entries.remove(0);
        }
        entries.push((key, value.clone()));
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Built once per key, the least recently used entry evicted at capacity.
    #[test]
    fn memo_builds_once_and_evicts_the_least_recently_used() {
        let memo: Memo<u32, u32> = Memo::new(2);
        let builds = std::cell::Cell::new(0);
        let get = |k: u32| {
            memo.get_or_build(k, || {
                builds.set(builds.get() + 1);
                k * 10
            })
        };
        assert_eq!((get(1), get(2), get(1)), (10, 20, 10));
        assert_eq!(builds.get(), 2, "1 is cached");
        assert_eq!(get(3), 30); // evicts 2, the least recently used
        assert_eq!(builds.get(), 3);
        assert_eq!(get(1), 10);
        assert_eq!(builds.get(), 3, "1 stayed");
        assert_eq!(get(2), 20);
        assert_eq!(builds.get(), 4, "2 was evicted and is rebuilt");
    }

    /// The hashed mask drops the asked-for fraction and differs between seeds.
    #[test]
    fn dropout_mask_has_its_rate_and_follows_the_seed() {
        let count = |seed: u32| {
            let dropout = Dropout::new(0.25, seed);
            let mut ones = vec![1.0f32; 4096];
            let mut kept = vec![];
            for row in 0..64 {
                ones.fill(1.0);
                dropout.apply_at(&mut ones, ((64 + row) * 4096) as u64);
                kept.extend(ones.iter().map(|&x| x > 0.0));
                assert!(
                    ones.iter()
                        .all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6)
                );
            }
            kept
        };
        let (a, b) = (count(1), count(2));
        let rate = a.iter().filter(|&&k| !k).count() as f64 / a.len() as f64;
        assert!((rate - 0.25).abs() < 0.005, "dropped fraction {rate}");
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
        assert!(same < 0.7, "seeds 1 and 2 agree on {same} of the mask");
    }

    /// The polynomial `exp` against f64's over [−87, 0], within 3e-7 relative (≈ 2.5 ulp).
    #[test]
    fn exp_matches_f64_over_its_domain() {
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(
            exp_nonpositive(-1000.0) < 1e-37,
            "clamped, not denormal or garbage"
        );
    }
}
