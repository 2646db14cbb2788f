//! Calibration thresholds and quantization parameters for static quantization.
//!
//! The host observes activations as histograms of |x| (the daemon keeps them as the calibration streams, with a range that grows by doubling);
//! this module turns such a histogram into a clipping threshold (entropy/KL or percentile),
//! and a real range into the scale and zero point of ONNX `QuantizeLinear`. The formulas follow
//! ONNX Runtime's quantization tool (`onnxruntime/quantization/calibrate.py` and
//! `quant_utils.py`) so that models quantized here agree with ones quantized there; where we
//! deliberately differ, the comment says so.

/// Result of [`kl_threshold`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold {
    /// Clipping threshold on |x|: the upper edge of the last kept bin (`bins_kept * bin_width`).
    pub threshold: f32,
    /// KL(P‖Q) at the chosen threshold (natural log). `0.0` when no clipping was considered
    /// (short or empty histogram); `+inf` when no candidate could be scored (see
    /// [`kl_threshold`]).
    pub kl: f64,
    /// Number of histogram bins below the threshold.
    pub bins_kept: usize,
}

/// Smoothing mass of ORT's `smooth_distribution`, in histogram-count units.
const SMOOTH_EPS: f64 = 0.0001;

/// The KL/entropy threshold (TensorRT's / ONNX Runtime's entropy calibration) on a histogram of
/// |x|: `counts` over `[0, bin_width * counts.len()]`.
///
/// Every candidate `i` in `num_quantized_bins ..= counts.len()` (every `stride`-th, with
/// `counts.len()` itself always tried; a `stride` of 0 is taken as 1) is scored:
///
/// * reference P = `counts[..i]`, with the outlier mass `counts[i..]` added to its last bin;
/// * candidate Q = `counts[..i]` (without the outliers) merged into `num_quantized_bins`
///   levels of `i / num_quantized_bins` bins each, the last level also taking the remainder,
///   then expanded back: each level's mass is spread uniformly over those of its bins that are
///   non-zero in P, and bins that are zero in P stay zero;
/// * both are smoothed as ORT's `smooth_distribution` does (see [`smooth`]); a candidate whose
///   smoothing is impossible is skipped;
/// * the score is KL(P‖Q) of the normalised distributions.
///
/// The candidate with the smallest KL wins (the first one on ties, as `np.argmin`). If
/// `counts.len() <= num_quantized_bins`, `num_quantized_bins == 0`, or the histogram is empty,
/// the full range is returned with `kl = 0`. If no candidate could be scored, the full range is
/// returned with `kl = +inf`.
///
/// Relation to ONNX Runtime's `HistogramCalibrater.get_entropy_threshold`: ORT histograms the
/// *signed* values, centred on zero, and tries symmetric windows `[zero - i, zero + i]`, merging
/// the whole window (both signs) into `num_quantized_bins` levels; its `i` is the window
/// half-width, which is our `i` here (bins of |x|). Because ORT spreads its levels over both
/// signs, ORT's `num_quantized_bins = 128` corresponds to `num_quantized_bins = 64` here;
/// TensorRT's |x| formulation (2048 bins, 128 levels for the 127 positive int8 steps) uses 128.
/// We also follow the MXNet/TensorRT reference rather than two ORT quirks: ORT's expansion
/// truncates level averages to integers and fills *every* bin of a level (including bins empty
/// in P, and leaving the remainder bins of the last level empty), and ORT asserts where the
/// smoothing fails whereas we skip the candidate. ORT also clamps the result to the observed
/// min/max; callers that know the observed max |x| should clamp the same way.
///
/// Cost is O(len² / stride) floating-point operations per histogram.
pub fn kl_threshold(
    counts: &[u64],
    bin_width: f32,
    num_quantized_bins: usize,
    stride: usize,
) -> Threshold {
    let n = counts.len();
    let full = Threshold {
        threshold: edge(n, bin_width),
        kl: 0.0,
        bins_kept: n,
    };
    let total = sum_counts(counts);
    if num_quantized_bins == 0 || n <= num_quantized_bins || total == 0 {
        return full;
    }
    let stride = stride.max(1);

    // Candidates: nq, nq + stride, ..., and always n (the unclipped range).
    let candidates = (num_quantized_bins..n)
        .step_by(stride)
        .chain(std::iter::once(n));

    let mut best: Option<(usize, f64)> = None;
    let mut p: Vec<f64> = Vec::with_capacity(n);
    let mut q: Vec<f64> = Vec::with_capacity(n);
    for i in candidates {
        let (kept, outliers) = counts.split_at(i.min(n));
        p.clear();
        p.extend(kept.iter().map(|&c| c as f64));
        if let Some(last) = p.last_mut() {
            *last += sum_counts(outliers) as f64;
        }
        q.clear();
        q.resize(p.len(), 0.0);
        expand_levels(kept, &p, &mut q, num_quantized_bins);

        if !smooth(&mut p) || !smooth(&mut q) {
            continue;
        }
        let kl = kl_divergence(&p, &q);
        // Strict `<` keeps the first minimum, as np.argmin does.
        if best.is_none_or(|(_, b)| kl < b) {
            best = Some((i, kl));
        }
    }

    match best {
        Some((i, kl)) => Threshold {
            threshold: edge(i, bin_width),
            kl,
            bins_kept: i,
        },
        None => Threshold {
            kl: f64::INFINITY,
            ..full
        },
    }
}

/// The value below which `percentile` percent (e.g. 99.99) of the |x| histogram's mass lies:
/// the upper edge of the first bin where the cumulative count reaches `total * percentile /
/// 100`. The percentile is clamped to `[0, 100]`, and NaN is taken as 100 (no clipping), the
/// safe choice for an unusable argument. So 100 gives the upper edge of the last non-empty bin,
/// and 0 the upper edge of the first bin. An empty histogram gives the full range
/// (`counts.len() * bin_width`), as [`kl_threshold`] does.
pub fn percentile_threshold(counts: &[u64], bin_width: f32, percentile: f64) -> f32 {
    let total = sum_counts(counts);
    if total == 0 {
        return edge(counts.len(), bin_width);
    }
    let pct = if percentile.is_nan() {
        100.0
    } else {
        percentile.clamp(0.0, 100.0)
    };
    // `min` guards against `total * 1.0` rounding above `total` for totals beyond 2^53.
    let target = (total as f64 * (pct / 100.0)).min(total as f64);
    let mut cum: u64 = 0;
    for (k, &c) in counts.iter().enumerate() {
        cum = cum.saturating_add(c);
        if cum as f64 >= target {
            return edge(k + 1, bin_width);
        }
    }
    // Unreachable in exact arithmetic (cum ends at total >= target); keep the full range.
    edge(counts.len(), bin_width)
}

/// Quantization parameters (`y = saturate(round(x / scale) + zero_point)`) for one tensor or
/// channel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    /// Positive, finite scale, as `QuantizeLinear` requires.
    pub scale: f32,
    /// Zero point, within `qmin..=qmax` for a valid integer range.
    pub zero_point: i32,
}

/// Quantization parameters of an activation range `[lo, hi]` for the integer range
/// `qmin..=qmax` (u8: `0..=255`, i8: `-128..=127`), as ORT's `compute_scale_zp`.
///
/// * The range is first widened to include 0, because ONNX requires real 0 to be exactly
///   representable (zero padding, ReLU outputs).
/// * Symmetric: `scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)` and
///   `zero_point = round((qmin + qmax) / 2)`, which is 0 for i8 and 128 for u8 (ORT uses this
///   scale-independent form so all channels of a per-channel tensor share one zero point).
/// * Asymmetric: `scale = (hi - lo) / (qmax - qmin)`,
///   `zero_point = round(qmin - lo / scale)` clamped to `[qmin, qmax]`.
/// * Rounding is half-to-even, as `numpy.round` in ORT: `(-128 + 127) / 2 = -0.5` rounds to
///   0 (half-away-from-zero would give -1), `127.5` rounds to 128.
/// * Arithmetic is in `f64` and the scale is rounded to `f32` last, as ORT does; the zero
///   point is computed from the `f64` scale, also as ORT does. (ORT subtracts `hi - lo` in
///   `f32`; we subtract in `f64`, which cannot overflow for extreme ranges.)
/// * A zero, subnormal or non-finite scale (constant-zero tensor, NaN/inf bounds) gives
///   `scale = 1.0` with the symmetric zero point: a constant-zero tensor must still be
///   representable (zero point maps it exactly), and `QuantizeLinear` needs a positive finite
///   scale. ORT uses zero point 0 here instead; for u8 we keep 128 so that the fallback does not
///   break the "one zero point for all channels" property the symmetric form exists for.
///
/// `qmin <= 0 <= qmax` with `qmin < qmax` is required (ORT raises otherwise); for any other
/// range this returns the fallback parameters, unclamped, rather than panicking.
pub fn qparams(lo: f32, hi: f32, qmin: i32, qmax: i32, symmetric: bool) -> QParams {
    let mid = round_half_even((f64::from(qmin) + f64::from(qmax)) / 2.0);
    let fallback = QParams {
        scale: 1.0,
        zero_point: mid,
    };
    // A NaN bound must not be silently dropped by `min`/`max` below: the range is unknown.
    if qmin > 0 || qmax < 0 || qmin >= qmax || !lo.is_finite() || !hi.is_finite() {
        return fallback;
    }
    let lo = f64::from(lo.min(0.0));
    let hi = f64::from(hi.max(0.0));
    let dq = f64::from(qmax) - f64::from(qmin);

    let scale = if symmetric {
        lo.abs().max(hi.abs()) / (dq / 2.0)
    } else {
        (hi - lo) / dq
    };
    let scale_f32 = scale as f32;
    // Finite bounds give a finite `f64` scale; it can still be zero or too small to be a normal
    // `f32` (ORT's `scale < finfo.tiny` test), or, in principle, overflow when narrowed.
    if scale < f64::from(f32::MIN_POSITIVE) || !scale_f32.is_finite() {
        return fallback;
    }
    let zero_point = if symmetric {
        mid
    } else {
        round_half_even(f64::from(qmin) - lo / scale).clamp(qmin, qmax)
    };
    QParams {
        scale: scale_f32,
        zero_point,
    }
}

/// Per-channel symmetric int8 weight parameters: for a weight of shape `shape` (row-major
/// `data`), one [`QParams`] per slice along `axis`, with `scale = max|w| / 127` and zero point
/// 0 — i.e. [`qparams`] over `[-max|w|, max|w|]` with the symmetric range `-127..=127`, as ORT
/// uses for symmetric int8 weights (dropping -128 keeps the range symmetric, so `-w` quantizes
/// to `-q`). A slice of zeros gets the [`qparams`] fallback `scale = 1.0`: every value in it
/// still quantizes exactly to 0, and the scale stays positive and finite.
///
/// Returns a vector of length `shape[axis]`, or `Err` when `axis` is out of range, the shape's
/// element count overflows, `data.len()` differs from it, or a weight is NaN/±inf (no finite
/// scale could represent it).
pub fn per_channel_symmetric(
    data: &[f32],
    shape: &[usize],
    axis: usize,
) -> Result<Vec<QParams>, String> {
    let channels = *shape
        .get(axis)
        .ok_or_else(|| format!("axis {axis} out of range for a rank-{} weight", shape.len()))?;
    let numel = product(shape).ok_or_else(|| format!("shape {shape:?} overflows usize"))?;
    if data.len() != numel {
        return Err(format!(
            "weight has {} values but shape {shape:?} needs {numel}",
            data.len()
        ));
    }
    if let Some(pos) = data.iter().position(|w| !w.is_finite()) {
        return Err(format!("weight value {pos} is not finite"));
    }
    // Product of the dimensions after `axis`: the length of one contiguous run of a channel.
    let inner = shape.get(axis + 1..).and_then(product).unwrap_or(1);

    let mut absmax = vec![0.0f32; channels];
    if inner > 0 && channels > 0 {
        // Row-major: the data is `outer` repetitions of `channels` runs of `inner` values, so
        // run `k` belongs to channel `k % channels`.
        for (run, ch) in data.chunks(inner).zip((0..channels).cycle()) {
            let m = run.iter().fold(0.0f32, |acc, w| acc.max(w.abs()));
            if let Some(a) = absmax.get_mut(ch) {
                *a = a.max(m);
            }
        }
    }
    Ok(absmax
        .into_iter()
        .map(|m| qparams(-m, m, -127, 127, true))
        .collect())
}

/// Upper edge of bin `k - 1`, i.e. `k * bin_width`, computed in `f64` so it is rounded once.
fn edge(k: usize, bin_width: f32) -> f32 {
    (k as f64 * f64::from(bin_width)) as f32
}

/// Sum of histogram counts; saturating so no input can make it panic.
fn sum_counts(counts: &[u64]) -> u64 {
    counts.iter().fold(0u64, |acc, &c| acc.saturating_add(c))
}

/// Product of dimensions, `None` on overflow.
fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Rounds half to even (numpy's rule), saturating into `i32`.
fn round_half_even(x: f64) -> i32 {
    // `as` saturates and maps NaN to 0; callers pass finite values in i32 range anyway.
    x.round_ties_even() as i32
}

/// Builds the candidate distribution Q (see [`kl_threshold`]): merges `kept` (P without the
/// outliers) into `levels` levels and spreads each level's mass over the bins of that level that
/// are non-zero in `p`. `p`, `kept` and `q` have the same length, at least `levels`.
fn expand_levels(kept: &[u64], p: &[f64], q: &mut [f64], levels: usize) {
    let per_level = kept.len() / levels.max(1);
    if per_level == 0 {
        return;
    }
    // The first `levels - 1` levels have `per_level` bins; the last takes the rest.
    let split = (per_level * (levels - 1)).min(kept.len());
    let (k_head, k_tail) = kept.split_at(split);
    let (p_head, p_tail) = p.split_at(split.min(p.len()));
    let (q_head, q_tail) = q.split_at_mut(split.min(p.len()));
    for ((k, pl), ql) in k_head
        .chunks(per_level)
        .zip(p_head.chunks(per_level))
        .zip(q_head.chunks_mut(per_level))
    {
        fill_level(k, pl, ql);
    }
    fill_level(k_tail, p_tail, q_tail);
}

/// Spreads one level's mass uniformly over the bins that are non-zero in P.
fn fill_level(kept: &[u64], p: &[f64], q: &mut [f64]) {
    let mass = sum_counts(kept) as f64;
    let norm = p.iter().filter(|&&v| v != 0.0).count();
    if norm == 0 {
        // All of P is zero here, hence so is `kept` (P >= kept bin by bin): nothing to spread.
        return;
    }
    let share = mass / norm as f64;
    for (qv, &pv) in q.iter_mut().zip(p) {
        *qv = if pv != 0.0 { share } else { 0.0 };
    }
}

/// ORT's `smooth_distribution(p, eps=0.0001)` in place: moves `eps` onto each zero bin, taking
/// the same total evenly off the non-zero bins, so KL(P‖Q) is finite. Returns `false` (leaving
/// `p` unusable) when smoothing is impossible: every bin zero, or a non-zero bin too small to
/// give up its share (ORT asserts in that case; it needs far more zero than non-zero bins —
/// thousands of times more for integer counts).
fn smooth(p: &mut [f64]) -> bool {
    let zeros = p.iter().filter(|&&v| v == 0.0).count();
    let nonzeros = p.len() - zeros;
    if nonzeros == 0 {
        return false;
    }
    let eps1 = SMOOTH_EPS * zeros as f64 / nonzeros as f64;
    let mut ok = true;
    for v in p.iter_mut() {
        if *v == 0.0 {
            *v = SMOOTH_EPS;
        } else {
            *v -= eps1;
            ok &= *v > 0.0;
        }
    }
    ok
}

/// KL(P‖Q) of the normalised distributions (natural log), as `scipy.stats.entropy(p, q)`.
/// Both inputs are smoothed, hence strictly positive.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let sp: f64 = p.iter().sum();
    let sq: f64 = q.iter().sum();
    // sum p/sp * ln((p/sp) / (q/sq)) = (1/sp) * sum p * ln(p/q) + ln(sq/sp)
    let raw: f64 = p.iter().zip(q).map(|(&a, &b)| a * (a / b).ln()).sum();
    raw / sp + (sq / sp).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic standard normal samples: 64-bit LCG + Box-Muller.
    fn gaussian(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed;
        let mut uniform = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64 // (0, 1)
        };
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let (u1, u2) = (uniform(), uniform());
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            out.push(r * t.cos());
            out.push(r * t.sin());
        }
        out.truncate(n);
        out
    }

    fn abs_hist(xs: &[f64], bins: usize, max: f64) -> Vec<u64> {
        let mut h = vec![0u64; bins];
        for &x in xs {
            let i = ((x.abs() / max * bins as f64) as usize).min(bins - 1);
            h[i] += 1;
        }
        h
    }

    #[test]
    fn kl_gaussian_with_outliers() {
        let mut xs = gaussian(42, 200_000);
        xs.extend([20.0, -18.0, 19.5, 15.0]); // far outliers (sigma = 1)
        let max = 20.0;
        let bins = 2048;
        let h = abs_hist(&xs, bins, max);
        let bw = (max / bins as f64) as f32;
        let t = kl_threshold(&h, bw, 128, 1);
        assert!(t.threshold < 10.0, "threshold {t:?}");
        assert!(t.threshold > 2.5, "threshold {t:?}");
        assert!(t.kl.is_finite() && t.kl >= 0.0);
        assert_eq!(t.threshold, edge(t.bins_kept, bw));
        // A stride still finds a nearby threshold.
        let t4 = kl_threshold(&h, bw, 128, 4);
        assert!(t4.kl >= t.kl);
        assert!((t4.threshold - t.threshold).abs() < 1.0, "{t4:?} vs {t:?}");
    }

    #[test]
    fn kl_uniform_keeps_nearly_everything() {
        let h = vec![100u64; 2048];
        let t = kl_threshold(&h, 0.01, 128, 1);
        let full = 2048.0 * 0.01;
        assert!(t.threshold > 0.95 * full, "{t:?}");
        assert!(t.threshold <= full + 1e-4);
    }

    #[test]
    fn kl_degenerate_inputs() {
        let full = |t: Threshold, n: usize| {
            assert_eq!(t.bins_kept, n);
            assert_eq!(t.kl, 0.0);
        };
        full(kl_threshold(&[], 1.0, 128, 1), 0);
        full(kl_threshold(&[0; 300], 1.0, 128, 1), 300);
        full(kl_threshold(&[5; 128], 1.0, 128, 1), 128);
        full(kl_threshold(&[5; 300], 1.0, 0, 1), 300);
        // Stride 0 acts as 1.
        let h: Vec<u64> = (0..512u64).map(|k| 1000 / (k + 1)).collect();
        assert_eq!(kl_threshold(&h, 1.0, 64, 0), kl_threshold(&h, 1.0, 64, 1));
    }

    #[test]
    fn kl_all_mass_in_one_tail_bin() {
        // Only the last bin is populated: every clipping candidate has an empty Q and is
        // skipped; the unclipped candidate is scored and wins.
        let mut h = vec![0u64; 256];
        h[255] = 10;
        let t = kl_threshold(&h, 1.0, 128, 1);
        assert_eq!(t.bins_kept, 256);
        assert!(t.kl.is_finite());
    }

    #[test]
    fn smoothing_matches_ort() {
        let mut p = vec![0.0, 2.0, 0.0, 3.0];
        assert!(smooth(&mut p));
        let eps1 = 0.0001 * 2.0 / 2.0;
        assert_eq!(p, vec![0.0001, 2.0 - eps1, 0.0001, 3.0 - eps1]);
        let mut z = vec![0.0; 4];
        assert!(!smooth(&mut z));
    }

    #[test]
    fn expansion_spreads_over_nonzero_bins_and_remainder() {
        // 7 bins into 2 levels: 3 bins, then 4 (remainder goes to the last level).
        let kept = [2u64, 0, 4, 1, 0, 0, 3];
        let p: Vec<f64> = kept.iter().map(|&c| c as f64).collect();
        let mut q = vec![0.0; 7];
        expand_levels(&kept, &p, &mut q, 2);
        assert_eq!(q, vec![3.0, 0.0, 3.0, 2.0, 0.0, 0.0, 2.0]);
    }

    #[test]
    fn percentile() {
        let h = vec![10u64; 100];
        assert_eq!(percentile_threshold(&h, 0.5, 100.0), 50.0);
        assert_eq!(percentile_threshold(&h, 0.5, 50.0), 25.0);
        assert_eq!(percentile_threshold(&h, 0.5, 99.0), 49.5);
        assert_eq!(percentile_threshold(&h, 0.5, 0.0), 0.5);
        assert_eq!(percentile_threshold(&h, 0.5, f64::NAN), 50.0);
        assert_eq!(percentile_threshold(&h, 0.5, 250.0), 50.0);
        // 100% stops at the last non-empty bin.
        let mut g = vec![1u64; 10];
        g.extend([0, 0]);
        assert_eq!(percentile_threshold(&g, 1.0, 100.0), 10.0);
        assert_eq!(percentile_threshold(&[], 1.0, 99.0), 0.0);
        assert_eq!(percentile_threshold(&[0, 0], 1.0, 99.0), 2.0);
    }

    #[test]
    fn qparams_u8_asymmetric() {
        let q = qparams(0.0, 2.55, 0, 255, false);
        assert!((q.scale - 0.01).abs() < 1e-7, "{q:?}");
        assert_eq!(q.zero_point, 0);
        // 0 - (-1) / (2/255) = 127.5 exactly in f64; half-to-even gives 128.
        let q = qparams(-1.0, 1.0, 0, 255, false);
        assert_eq!(q.scale, (2.0f64 / 255.0) as f32);
        assert_eq!(q.zero_point, 128);
        // Range widened to include 0.
        let q = qparams(1.0, 2.55, 0, 255, false);
        assert!((q.scale - 0.01).abs() < 1e-7);
        assert_eq!(q.zero_point, 0);
        let q = qparams(-2.55, -1.0, 0, 255, false);
        assert_eq!(q.zero_point, 255);
    }

    #[test]
    fn qparams_symmetric() {
        // i8: absmax 2 over (127 - (-128)) / 2 = 127.5 levels; zp round(-0.5) = 0.
        let q = qparams(-2.0, 1.0, -128, 127, true);
        assert_eq!(q.scale, (2.0f64 / 127.5) as f32);
        assert_eq!(q.zero_point, 0);
        // u8: zp round(127.5) = 128.
        let q = qparams(-2.0, 1.0, 0, 255, true);
        assert_eq!(q.scale, (2.0f64 / 127.5) as f32);
        assert_eq!(q.zero_point, 128);
        // Reduced symmetric range -127..=127: scale absmax / 127.
        let q = qparams(-0.5, 1.27, -127, 127, true);
        assert_eq!(q.scale, (1.27f32 as f64 / 127.0) as f32);
        assert_eq!(q.zero_point, 0);
    }

    #[test]
    fn qparams_degenerate() {
        let one = |q: QParams, zp: i32| {
            assert_eq!(
                q,
                QParams {
                    scale: 1.0,
                    zero_point: zp
                }
            )
        };
        one(qparams(0.0, 0.0, 0, 255, false), 128);
        one(qparams(0.0, 0.0, -128, 127, true), 0);
        one(qparams(f32::NAN, 1.0, 0, 255, false), 128);
        one(qparams(-1.0, f32::INFINITY, -128, 127, false), 0);
        one(qparams(1e-45, 1e-45, -128, 127, true), 0);
        // Invalid integer ranges do not panic.
        one(qparams(-1.0, 1.0, 5, 2, false), 4);
        one(qparams(-1.0, 1.0, 1, 255, false), 128);
        // Extreme but finite ranges do not overflow.
        let q = qparams(-f32::MAX, f32::MAX, 0, 255, false);
        assert!(q.scale.is_finite() && q.scale > 0.0);
        assert_eq!(q.zero_point, 128);
    }

    #[test]
    fn per_channel_axis0_and_axis1() {
        let w = [1.27f32, -0.5, 0.0, 0.0, -2.54, 0.1];
        let by_row = per_channel_symmetric(&w, &[2, 3], 0).unwrap();
        assert_eq!(by_row.len(), 2);
        assert_eq!(by_row[0].scale, (1.27f32 as f64 / 127.0) as f32);
        assert_eq!(by_row[1].scale, (2.54f32 as f64 / 127.0) as f32);
        assert!(by_row.iter().all(|q| q.zero_point == 0));

        let by_col = per_channel_symmetric(&w, &[2, 3], 1).unwrap();
        assert_eq!(by_col.len(), 3);
        assert_eq!(by_col[0].scale, (1.27f32 as f64 / 127.0) as f32);
        assert_eq!(by_col[1].scale, (2.54f32 as f64 / 127.0) as f32);
        assert_eq!(by_col[2].scale, (0.1f32 as f64 / 127.0) as f32);

        // A zero channel falls back to scale 1.
        let z = per_channel_symmetric(&[0.0, 0.0, 3.0, 1.0], &[2, 2], 0).unwrap();
        assert_eq!(
            z[0],
            QParams {
                scale: 1.0,
                zero_point: 0
            }
        );
        assert_eq!(z[1].scale, (3.0f64 / 127.0) as f32);
    }

    #[test]
    fn per_channel_middle_axis() {
        // Shape [2, 2, 2]: channel c along axis 1 holds w[o][c][k].
        let w = [1.0f32, 2.0, -3.0, 4.0, -5.0, 0.5, 6.0, -0.25];
        let q = per_channel_symmetric(&w, &[2, 2, 2], 1).unwrap();
        assert_eq!(q[0].scale, (5.0f64 / 127.0) as f32);
        assert_eq!(q[1].scale, (6.0f64 / 127.0) as f32);
    }

    #[test]
    fn per_channel_errors_and_empty() {
        assert!(per_channel_symmetric(&[1.0; 6], &[2, 3], 2).is_err());
        assert!(per_channel_symmetric(&[1.0; 5], &[2, 3], 0).is_err());
        assert!(per_channel_symmetric(&[], &[usize::MAX, 3], 0).is_err());
        assert!(per_channel_symmetric(&[1.0, f32::NAN], &[2], 0).is_err());
        assert!(per_channel_symmetric(&[1.0, f32::INFINITY], &[2], 0).is_err());
        // Zero-sized dimensions: no data, channels all zero or none at all.
        let q = per_channel_symmetric(&[], &[3, 0], 0).unwrap();
        assert_eq!(
            q,
            vec![
                QParams {
                    scale: 1.0,
                    zero_point: 0
                };
                3
            ]
        );
        assert!(per_channel_symmetric(&[], &[0, 3], 0).unwrap().is_empty());
        // Rank-0 weight has no axis 0.
        assert!(per_channel_symmetric(&[1.0], &[], 0).is_err());
    }
}
