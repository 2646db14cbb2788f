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

/// The least range for values up to `x` in `bins` bins: `x · (1 + 1/bins)`, so `x` falls
/// at most `bins / (bins + 1)` of the way across the last bin — never on the upper edge, nor
/// rounded onto it.
pub fn headroom(x: f32, bins: usize) -> f32 {
    x + x / bins.max(1) as f32
}

/// A histogram of |x| over `[0, max]` with a fixed number of bins whose range grows by
/// doubling, so memory stays constant however many batches are seen and counts stay exact.
///
/// * Value `v` goes to bin `floor(v / max * bins)`: bins are half-open `[k·w, (k+1)·w)`.
/// * The range keeps a headroom of `1/bins` above every binned value ([`headroom`]): no value
///   lies on the upper edge, so none needs a closed last bin.
/// * The first batch holding a finite value fixes the initial range at that batch's max |x|
///   plus the headroom, floored at [`MIN_RANGE`] (an all-zero first batch gives
///   `max = MIN_RANGE`).
/// * When a later batch needs more (its max |x| plus the headroom is above `max`), the range
///   doubles as many times as needed and adjacent bins are summed pairwise each time; the bin
///   count never changes. Every range is `initial · 2^k` and the binning multiplier scales by
///   exact powers of two, so each old bin lies entirely inside one new bin: the histogram is
///   the one binning every value afresh at the final range would give, whatever the order of
///   the batches, and two histograms started from one range [`merge`](Self::merge) exactly.
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

        let need = headroom(batch_max, self.counts.len());
        if self.max <= 0.0 {
            self.max = need.max(MIN_RANGE);
        } else if need > self.max {
            self.grow_to(need);
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
            // `a * scale` is below `bins - 1/2` (the headroom); the float-to-int cast
            // saturates, so a value above `max` (only possible when the range hit f32::MAX)
            // lands in the last bin.
            let idx = ((a * scale) as usize).min(last);
            if let Some(c) = self.counts.get_mut(idx) {
                *c = c.saturating_add(1);
            }
        }
    }

    /// Folds in another histogram of the same bin count, as if its values had been passed to
    /// [`update`](Self::update) here (used to combine the calibration lanes).
    ///
    /// Exact when the two ranges are the same up to a power of two (histograms that started
    /// from one range: every later range is a doubling of it). Otherwise each of `other`'s
    /// bins goes to the bin holding its centre, at most one bin away from where its values
    /// would have fallen.
    pub fn merge(&mut self, other: &AbsHistogram) {
        self.nan = self.nan.saturating_add(other.nan);
        self.inf = self.inf.saturating_add(other.inf);
        if other.max <= 0.0 || other.total() == 0 {
            return;
        }
        if self.max <= 0.0 || self.total() == 0 {
            // Nothing binned here yet: take the other's range (and counts) as they are.
            if self.counts.len() == other.counts.len() {
                self.max = other.max;
                self.counts.clone_from(&other.counts);
                return;
            }
            self.max = other.max;
        } else if other.max > self.max {
            self.grow_to(other.max);
        }
        let Some(last) = self.counts.len().checked_sub(1) else {
            return;
        };
        // `other`'s bin i spans [i, i+1) * ow; it maps onto our bins i * ow / w.
        let ratio = f64::from(other.max) / f64::from(self.max) * self.counts.len() as f64
            / other.counts.len() as f64;
        let k = (-ratio.log2()).round();
        let exact = ratio > 0.0 && (0.0..63.0).contains(&k) && ratio * k.exp2() == 1.0;
        for (i, &c) in other.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let idx = if exact {
                i >> (k as u32)
            } else {
                (((i as f64 + 0.5) * ratio) as usize).min(last)
            };
            if let Some(slot) = self.counts.get_mut(idx.min(last)) {
                *slot = slot.saturating_add(c);
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
        // Range fixed at 4.0 plus a quarter: 5.0, width 1.25.
        h.update(&[0.0, 0.5, -1.0, 1.5, 2.0, -3.999, 4.0, -4.0]);
        assert_eq!(h.max, 5.0);
        assert_eq!(h.bin_width(), 1.25);
        assert_eq!(h.counts, vec![3, 2, 0, 3]);
        assert_eq!(h.total(), 8);
        // Within range (3.0 plus its headroom is 3.75): no growth.
        h.update(&[3.0, 0.25]);
        assert_eq!(h.max, 5.0);
        assert_eq!(h.counts, vec![4, 2, 1, 3]);
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
        // Infinity did not widen the range: 2.0 and its headroom.
        assert_eq!(h.max, 2.5);
        assert_eq!((h.nan, h.inf, h.total()), (2, 3, 2));
        assert_eq!(h.counts, vec![0, 1, 0, 1]);
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
        assert!(h.max > 1.0 && h.max < 2.25, "max {}", h.max);
        assert_eq!(h.counts[0], 3);
        let idx = (8.0 / h.max) as usize; // where 1.0 falls at the grown range
        assert!(idx >= 4);
        assert_eq!(h.counts[idx], 1);
        assert_eq!(h.total(), 4);
    }

    #[test]
    fn hist_pairwise_merge_once() {
        let mut h = AbsHistogram::new(4);
        h.update(&[0.1, 0.3, 0.6, 0.9]); // range 1.125: bin edges 0.28125, 0.5625, 0.84375
        assert_eq!(h.counts, vec![1, 1, 1, 1]);
        h.update(&[1.5]); // needs 1.875: doubles once to 2.25
        assert_eq!(h.max, 2.25);
        assert_eq!(h.counts, vec![2, 2, 1, 0]);
        assert_eq!(h.total(), 5);
    }

    #[test]
    fn hist_merge_of_lanes_on_one_base_range_is_exact() {
        // Three lanes that all start from the first lane's range (as the calibrator seeds
        // them), fed different batches, merge into exactly the serial histogram.
        let batches: Vec<Vec<f32>> = (0..6)
            .map(|i| lcg_values(i + 10, 3000, 0.5 * 3f32.powi(i as i32)))
            .collect();
        let mut serial = AbsHistogram::new(128);
        for b in &batches {
            serial.update(b);
        }
        let mut first = AbsHistogram::new(128);
        first.update(&batches[0]);
        let mut lanes: Vec<AbsHistogram> = (0..2)
            .map(|_| {
                let mut h = AbsHistogram::new(128);
                h.max = first.max;
                h
            })
            .collect();
        for (i, b) in batches.iter().enumerate().skip(1) {
            if i % 2 == 0 {
                first.update(b);
            } else {
                lanes[i % 4 / 2].update(b);
            }
        }
        lanes[0].update(&[f32::NAN, f32::INFINITY]);
        serial.update(&[f32::NAN, f32::INFINITY]);
        for l in &lanes {
            first.merge(l);
        }
        assert_eq!(first, serial);
        // Merging an empty histogram changes nothing; merging into one takes the other.
        let before = first.clone();
        first.merge(&AbsHistogram::new(128));
        assert_eq!(first, before);
        let mut empty = AbsHistogram::new(128);
        empty.merge(&before);
        assert_eq!(empty, before);
    }

    #[test]
    fn hist_merge_of_unrelated_ranges_keeps_every_count() {
        let mut a = AbsHistogram::new(64);
        a.update(&lcg_values(1, 1000, 1.0));
        let mut b = AbsHistogram::new(64);
        b.update(&lcg_values(2, 1000, 3.0));
        let total = a.total() + b.total();
        a.merge(&b);
        assert_eq!(a.total(), total);
        assert!(a.max >= b.max);
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
    fn hist_doubling_matches_the_direct_histogram_bin_for_bin() {
        // Ranges grow by doubling from the first batch's; batches put values on every earlier
        // range's edge and on powers of two. Binned batch by batch or all at the final range,
        // and in any batch order, the counts are the same.
        let mut b1 = lcg_values(1, 5000, 0.999);
        b1.push(1.0);
        let mut b2 = lcg_values(2, 5000, 7.9);
        b2.extend([-8.0, 1.0, headroom(1.0, 64)]);
        let mut b3 = lcg_values(3, 5000, 63.0);
        b3.extend([64.0, 8.0, 2.0 * headroom(1.0, 64)]);
        let batches = [b1, b2, b3];

        let mut h = AbsHistogram::new(64);
        for b in &batches {
            h.update(b);
        }
        let mut direct = AbsHistogram::new(64);
        direct.max = h.max;
        for b in &batches {
            direct.update(b);
        }
        assert_eq!(direct.max, h.max, "the final range holds every value");
        assert_eq!(h.counts, direct.counts);
        assert_eq!(h.total(), 15007);

        let mut reversed = AbsHistogram::new(64);
        reversed.max = headroom(1.0, 64);
        for b in batches.iter().rev() {
            reversed.update(b);
        }
        assert_eq!(reversed, h);
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
