//! Streaming observers the host keeps per tensor while calibration batches flow through the
//! model.
//!
//! Calibration may see many batches of large activations; the host must never keep the
//! activations themselves, only a fixed-size summary that can be updated batch by batch. Both
//! observers here use memory independent of how many values they have seen, and both ignore NaN
//! (a NaN says nothing about the range a quantized tensor must cover).

/// Running min/max of a tensor's values (NaN ignored).
///
/// Infinities are real values of the tensor and do update `min`/`max`: the observer records
/// what was seen, and it is for whoever turns the range into quantization parameters to decide
/// what to do with an infinite range.
#[derive(Clone, Debug, PartialEq)]
pub struct MinMax {
    /// Smallest non-NaN value seen; `+inf` while nothing has been seen.
    pub min: f32,
    /// Largest non-NaN value seen; `-inf` while nothing has been seen.
    pub max: f32,
    /// Number of non-NaN values folded into `min`/`max`. NaN values are not counted so that
    /// `count == 0` means exactly "min/max are not meaningful yet".
    pub count: u64,
}

impl MinMax {
    /// An observer that has seen nothing: `min = +inf`, `max = -inf`, so that the first value
    /// folded in replaces both without a special case.
    pub fn new() -> Self {
        MinMax {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
        }
    }

    /// Folds a batch of values in. NaN is skipped.
    pub fn update(&mut self, xs: &[f32]) {
        let mut lo = self.min;
        let mut hi = self.max;
        let mut seen: u64 = 0;
        for &x in xs {
            // `f32::min`/`max` return the other operand when one is NaN, so NaN never
            // reaches lo/hi; it is only excluded from the count.
            lo = lo.min(x);
            hi = hi.max(x);
            seen += u64::from(!x.is_nan());
        }
        self.min = lo;
        self.max = hi;
        self.count = self.count.saturating_add(seen);
    }

    /// Folds in another observer's state, as if its values had been passed to
    /// [`MinMax::update`] here (used to combine per-worker observers).
    pub fn merge(&mut self, other: &MinMax) {
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.count = self.count.saturating_add(other.count);
    }

    /// Whether no non-NaN value has been seen (`min`/`max` are then still `+inf`/`-inf`).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl Default for MinMax {
    /// Same as [`MinMax::new`]; a derived default would start at `0.0`, which would wrongly
    /// widen every observed range to include zero.
    fn default() -> Self {
        Self::new()
    }
}

/// The range used when the first batch that fixes the range holds only zeros (or values
/// smaller than this). It must be positive so that `bins / max` is finite; it is far below any
/// meaningful activation magnitude, so the first real batch doubles it up to scale, and it is
/// large enough that `bins / MIN_RANGE` stays finite in `f32` for any practical bin count
/// (up to about 3e8 bins). The same floor keeps a subnormal batch maximum from making the
/// multiplier overflow to infinity.
pub const MIN_RANGE: f32 = 1e-30;

/// A histogram of |x| over `[0, max]` with a fixed number of bins whose range grows by
/// doubling, so memory stays constant however many batches are seen and counts stay exact.
///
/// * Value `v` goes to bin `min(floor(v / max * bins), bins - 1)`: bins are half-open
///   `[k·w, (k+1)·w)` except the last, which also takes `v == max`.
/// * The first batch holding a finite value fixes the initial range at that batch's max |x|,
///   floored at [`MIN_RANGE`] (so an all-zero first batch gives `max = MIN_RANGE`).
/// * When a later batch holds a finite value above `max`, the range doubles (as many times as
///   needed) and adjacent bins are summed pairwise each time; the bin count never changes.
///   Because every range is `initial · 2^k`, each old bin lies entirely inside one new bin and
///   no count is ever split or approximated. The one boundary subtlety: a value that was exactly
///   equal to an earlier `max` sat in that range's closed last bin, and after doubling it stays
///   in the bin whose *upper* edge it lies on, whereas binning it afresh at the new range would
///   put it in the bin it is the *lower* edge of. It is never more than that edge away.
/// * NaN is skipped and counted in `nan`; ±inf are counted in `inf` and not binned. Infinities
///   do not widen the range: doubling towards infinity would never end, and one overflow would
///   collapse every finite value into bin 0.
/// * The range never grows past `f32::MAX`: a finite value that would need a larger range (only
///   values above `f32::MAX / 2` can) is counted in the last bin instead.
#[derive(Clone, Debug, PartialEq)]
pub struct AbsHistogram {
    /// Per-bin counts; the length is fixed at construction and always even.
    pub counts: Vec<u64>,
    /// Upper edge of the last bin; `0.0` until the first batch with a finite value.
    pub max: f32,
    /// Number of NaN values seen (not binned).
    pub nan: u64,
    /// Number of ±inf values seen (not binned).
    pub inf: u64,
}

impl AbsHistogram {
    /// An empty histogram with `bins` bins. Pairwise merging needs an even count, so an odd
    /// `bins` is rounded up to the next even number, and fewer than 2 bins become 2.
    pub fn new(bins: usize) -> Self {
        let bins = bins.max(2);
        let bins = if bins % 2 == 1 {
            // usize::MAX is odd and has no even successor; round down there instead.
            bins.checked_add(1).unwrap_or(bins - 1)
        } else {
            bins
        };
        AbsHistogram {
            counts: vec![0; bins],
            max: 0.0,
            nan: 0,
            inf: 0,
        }
    }

    /// Folds a batch of values in.
    ///
    /// Two passes over the batch: the first finds the batch's max |x| (and counts NaN/inf),
    /// so the range grows at most once per batch; the second bins with a precomputed
    /// `bins / max` multiplier, so the hot loop has one multiply and no division.
    pub fn update(&mut self, xs: &[f32]) {
        let mut batch_max = 0.0f32;
        let mut finite: u64 = 0;
        let mut nan: u64 = 0;
        for &x in xs {
            let a = x.abs();
            if a.is_finite() {
                batch_max = batch_max.max(a);
                finite += 1;
            } else if a.is_nan() {
                nan += 1;
            }
        }
        let non_finite = u64::try_from(xs.len()).unwrap_or(u64::MAX) - finite;
        self.nan = self.nan.saturating_add(nan);
        self.inf = self.inf.saturating_add(non_finite - nan);
        if finite == 0 {
            return;
        }

        if self.max <= 0.0 {
            self.max = batch_max.max(MIN_RANGE);
        } else if batch_max > self.max {
            self.grow_to(batch_max);
        }

        // `new` never makes an empty histogram, but the fields are public.
        let Some(last) = self.counts.len().checked_sub(1) else {
            return;
        };
        // `bins as f32` is exact below 2^24 bins; beyond that the multiplier is merely a
        // little off, and the clamp below still keeps every index in bounds.
        let scale = self.counts.len() as f32 / self.max;
        for &x in xs {
            let a = x.abs();
            if !a.is_finite() {
                continue;
            }
            // `a * scale >= 0`; the float-to-int cast saturates, so a value above `max`
            // (only possible when the range hit f32::MAX) lands in the last bin.
            let idx = ((a * scale) as usize).min(last);
            if let Some(c) = self.counts.get_mut(idx) {
                *c = c.saturating_add(1);
            }
        }
    }

    /// Width of one bin (`max / bins`); `0.0` while the range is not fixed.
    pub fn bin_width(&self) -> f32 {
        self.max / self.counts.len() as f32
    }

    /// Number of binned (finite) values; NaN and ±inf are not included.
    pub fn total(&self) -> u64 {
        self.counts
            .iter()
            .fold(0u64, |acc, &c| acc.saturating_add(c))
    }

    /// Doubles the range until it covers `target`, merging bins accordingly.
    fn grow_to(&mut self, target: f32) {
        let mut doublings: u32 = 0;
        let mut max = self.max;
        while max < target {
            let doubled = max * 2.0;
            if !doubled.is_finite() {
                // Stop short of infinity; values above the range fall in the last bin.
                break;
            }
            max = doubled;
            doublings += 1;
        }
        self.max = max;
        self.coarsen(doublings);
    }

    /// Applies `k` pairwise merges at once: after `k` doublings, new bin `j` holds old bins
    /// `[j·2^k, (j+1)·2^k)` — the same result as merging pairwise `k` times, in one pass.
    fn coarsen(&mut self, k: u32) {
        if k == 0 {
            return;
        }
        let n = self.counts.len();
        match 1usize.checked_shl(k).filter(|&f| f < n) {
            Some(factor) => {
                let mut merged: Vec<u64> = self
                    .counts
                    .chunks(factor)
                    .map(|c| c.iter().fold(0u64, |acc, &v| acc.saturating_add(v)))
                    .collect();
                merged.resize(n, 0);
                self.counts = merged;
            }
            None => {
                // The range grew by at least the bin count: everything old fits in bin 0.
                // (Also covers a huge `k` from growing out of MIN_RANGE.)
                let total = self.total();
                self.counts.fill(0);
                if let Some(first) = self.counts.first_mut() {
                    *first = total;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minmax_basic_and_nan() {
        let mut m = MinMax::new();
        assert!(m.is_empty());
        assert_eq!(m, MinMax::default());
        m.update(&[]);
        assert!(m.is_empty());
        m.update(&[f32::NAN, f32::NAN]);
        assert!(m.is_empty());
        assert_eq!(m.min, f32::INFINITY);
        m.update(&[1.0, -2.0, f32::NAN, 3.5]);
        assert_eq!((m.min, m.max, m.count), (-2.0, 3.5, 3));
        m.update(&[f32::NAN, 0.5]);
        assert_eq!((m.min, m.max, m.count), (-2.0, 3.5, 4));
    }

    #[test]
    fn minmax_merge() {
        let mut a = MinMax::new();
        a.update(&[1.0, 2.0]);
        let mut b = MinMax::new();
        b.update(&[-5.0]);
        let empty = MinMax::new();
        a.merge(&empty);
        assert_eq!((a.min, a.max, a.count), (1.0, 2.0, 2));
        a.merge(&b);
        assert_eq!((a.min, a.max, a.count), (-5.0, 2.0, 3));
        let mut c = MinMax::new();
        c.update(&[1.0, 2.0, -5.0]);
        assert_eq!(a, c);
    }

    #[test]
    fn minmax_infinities_are_values() {
        let mut m = MinMax::new();
        m.update(&[f32::INFINITY, 1.0]);
        assert_eq!((m.min, m.max, m.count), (1.0, f32::INFINITY, 2));
    }

    #[test]
    fn hist_rounds_bins_to_even() {
        assert_eq!(AbsHistogram::new(7).counts.len(), 8);
        assert_eq!(AbsHistogram::new(8).counts.len(), 8);
        assert_eq!(AbsHistogram::new(0).counts.len(), 2);
        assert_eq!(AbsHistogram::new(1).counts.len(), 2);
    }

    #[test]
    fn hist_exact_counts_small() {
        let mut h = AbsHistogram::new(4);
        // Range fixed at 4.0, width 1.0.
        h.update(&[0.0, 0.5, -1.0, 1.5, 2.0, -3.999, 4.0, -4.0]);
        assert_eq!(h.max, 4.0);
        assert_eq!(h.bin_width(), 1.0);
        assert_eq!(h.counts, vec![2, 2, 1, 3]);
        assert_eq!(h.total(), 8);
        // Within range: no growth.
        h.update(&[3.0, 0.25]);
        assert_eq!(h.max, 4.0);
        assert_eq!(h.counts, vec![3, 2, 1, 4]);
    }

    #[test]
    fn hist_empty_input_is_noop() {
        let mut h = AbsHistogram::new(4);
        h.update(&[]);
        assert_eq!(h, AbsHistogram::new(4));
        assert_eq!(h.bin_width(), 0.0);
        h.update(&[1.0]);
        let before = h.clone();
        h.update(&[]);
        assert_eq!(h, before);
    }

    #[test]
    fn hist_nan_inf() {
        let mut h = AbsHistogram::new(4);
        h.update(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        assert_eq!((h.nan, h.inf, h.total(), h.max), (1, 2, 0, 0.0));
        h.update(&[2.0, f32::NAN, f32::INFINITY, 1.0]);
        // Infinity did not widen the range.
        assert_eq!(h.max, 2.0);
        assert_eq!((h.nan, h.inf, h.total()), (2, 3, 2));
        assert_eq!(h.counts, vec![0, 0, 1, 1]);
    }

    #[test]
    fn hist_all_zero_first_batch() {
        let mut h = AbsHistogram::new(8);
        h.update(&[0.0, -0.0, 0.0]);
        assert_eq!(h.max, MIN_RANGE);
        assert_eq!(h.counts[0], 3);
        assert_eq!(h.total(), 3);
        // A real batch afterwards grows the range by many doublings; the zeros stay in bin 0.
        h.update(&[1.0]);
        assert!(h.max >= 1.0 && h.max < 2.0, "max {}", h.max);
        assert_eq!(h.counts[0], 3);
        let idx = (8.0 / h.max) as usize; // where 1.0 falls at the grown range
        assert!(idx >= 4);
        assert_eq!(h.counts[idx], 1);
        assert_eq!(h.total(), 4);
    }

    #[test]
    fn hist_pairwise_merge_once() {
        let mut h = AbsHistogram::new(4);
        h.update(&[0.1, 0.3, 0.6, 0.9]); // range 0.9: bin edges 0.225, 0.45, 0.675
        assert_eq!(h.counts, vec![1, 1, 1, 1]);
        h.update(&[1.5]); // doubles once to 1.8
        assert_eq!(h.max, 1.8);
        assert_eq!(h.counts, vec![2, 2, 0, 1]);
        assert_eq!(h.total(), 5);
    }

    /// Deterministic pseudo-random values (64-bit LCG), scaled to `[-scale, scale)`.
    fn lcg_values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                (u * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn hist_doubling_matches_direct_histogram() {
        // Ranges 1 → 8 → 64 (power-of-two related). Each batch's max is placed exactly on a
        // power of two so the first batch fixes max = 1.0 exactly.
        let mut b1 = lcg_values(1, 5000, 0.999);
        b1.push(1.0);
        let mut b2 = lcg_values(2, 5000, 7.9);
        b2.push(-8.0);
        let mut b3 = lcg_values(3, 5000, 63.0);
        b3.push(64.0);
        let batches = [b1, b2, b3];

        let mut h = AbsHistogram::new(64);
        for b in &batches {
            h.update(b);
        }
        assert_eq!(h.max, 64.0);

        // Direct histogram at the final range.
        let mut direct = AbsHistogram::new(64);
        direct.max = 64.0;
        for b in &batches {
            direct.update(b);
        }
        assert_eq!(direct.max, 64.0);
        assert_eq!(h.total(), direct.total());
        assert_eq!(h.total(), 15003);

        // The only permitted difference: values exactly equal to an earlier range maximum
        // (1.0 and 8.0) sit in the bin below their edge. At range 64 with 64 bins, 1.0 is the
        // lower edge of bin 1 (merged: bin 0) and 8.0 the lower edge of bin 8 (merged: bin 7).
        let mut expected = direct.counts.clone();
        expected[1] -= 1;
        expected[0] += 1;
        expected[8] -= 1;
        expected[7] += 1;
        assert_eq!(h.counts, expected);
    }

    #[test]
    fn hist_doubling_without_edge_values_is_exact() {
        // Initial range 0.75 (first batch max); later ranges 0.75·2^k. No later value sits on
        // an intermediate maximum, so merged and direct histograms agree bin for bin except the
        // first batch's own maximum.
        let mut b1 = lcg_values(11, 3000, 0.7);
        b1.push(0.75);
        let b2 = lcg_values(12, 3000, 2.9); // needs 0.75·4 = 3.0
        let b3 = lcg_values(13, 3000, 11.9); // needs 0.75·16 = 12.0
        let batches = [b1, b2, b3];
        let mut h = AbsHistogram::new(32);
        for b in &batches {
            h.update(b);
        }
        assert_eq!(h.max, 12.0);
        let mut direct = AbsHistogram::new(32);
        direct.max = 12.0;
        for b in &batches {
            direct.update(b);
        }
        // 0.75 at range 12 with 32 bins is the lower edge of bin 2; merged keeps it in bin 1.
        let mut expected = direct.counts.clone();
        expected[2] -= 1;
        expected[1] += 1;
        assert_eq!(h.counts, expected);
        assert_eq!(h.total(), 9001);
    }

    #[test]
    fn hist_huge_values_do_not_overflow_range() {
        let mut h = AbsHistogram::new(4);
        h.update(&[1.0e38]);
        h.update(&[f32::MAX]);
        assert!(h.max.is_finite());
        assert_eq!(h.total(), 2);
        assert_eq!(h.counts.iter().sum::<u64>(), 2);
    }

    #[test]
    fn hist_subnormal_first_batch() {
        let mut h = AbsHistogram::new(4);
        h.update(&[1e-40]);
        assert_eq!(h.max, MIN_RANGE);
        assert_eq!(h.counts, vec![1, 0, 0, 0]);
    }
}
