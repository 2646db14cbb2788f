//! 2-D MaxPool without indices, separable: first each input row's window maximum at every
//! output column, then each output row as the elementwise maximum of its window's rows. The
//! direct loop reads `kh * kw` taps per output through the tap tables; this reads `kw` per
//! input row and output column (with the interior columns in a loop of constant kernel width
//! and stride) and `kh` contiguous rows per output row, loops that vectorize. (f32 windows
//! stepping 2 columns over 2 or 3, on AVX-512 or AVX, take [`super::stride2`]'s one pass instead.)
//!
//! NaN as the direct loop, where a window's first tap starts the maximum (a NaN there stays)
//! and a later tap replaces it only when greater: both passes take the maximum of the taps
//! that are not NaN (from -∞, which a NaN never replaces; `v > m ? v : m` is also exactly
//! `maxps(v, m)`), and an output whose window starts on a NaN is that NaN. The row pass keeps
//! each window's first tap beside its maximum for that.

use super::{PoolElem, Taps};
use crate::nn::{Arith, Real};
use crate::simd::simd_fn;

/// The geometry of [`max_plane_separable`]: the input row's width, the row and column tap
/// tables (offsets into the plane), the output row's width, and the column kernel and stride
/// when the dilation is 1.
#[derive(Clone, Copy)]
pub(super) struct Separable<'a> {
    pub w_in: usize,
    pub rows_of: &'a Taps,
    pub cols_of: &'a Taps,
    pub out_w: usize,
    pub fast: Option<(usize, usize)>,
    /// [`interior`] of these columns, worked out once per geometry.
    pub interior: Option<(usize, usize, usize)>,
}

/// The output columns `lo..hi` whose windows lie wholly inside the row (constant kernel
/// width and stride: `fast`, as in [`Separable`]), with the first one's first column `c0`.
pub(super) fn interior(
    cols_of: &Taps,
    out_w: usize,
    fast: Option<(usize, usize)>,
) -> Option<(usize, usize, usize)> {
    let (kw, _) = fast?;
    let lo = (0..out_w).find(|&ow| cols_of.of(ow).len() == kw)?;
    let hi = (lo..out_w)
        .find(|&ow| cols_of.of(ow).len() != kw)
        .unwrap_or(out_w);
    Some((lo, hi, *cols_of.of(lo).first()?))
}

simd_fn! {
    /// One plane `xp` into `yp`. `h`: scratch of 2 x input rows x output columns (the row
    /// pass's maxima, then its first taps); `acc`: one output row's scratch.
    ///
    /// Compiled for AVX-512 and AVX2 too ([`simd_fn!`]): the passes are compare-and-select
    /// loops that the SSE2 baseline runs 4 floats at a time.
    pub(super) fn max_plane_separable<T: PoolElem>(
        xp: &[T],
        geometry: &Separable<'_>,
        h: &mut [T::C],
        acc: &mut Vec<T::C>,
        yp: &mut [T],
    ) {
        let Separable {
            w_in,
            rows_of,
            cols_of,
            out_w,
            fast,
            interior,
        } = *geometry;
        let neg = <T::C as Real>::NEG_INFINITY;
        let (h, hf) = h.split_at_mut(h.len() / 2);
        let interior = interior.and_then(|(lo, hi, c0)| Some((lo, hi, c0, fast?.0, fast?.1)));
        let rows = xp
            .chunks_exact(w_in.max(1))
            .zip(h.chunks_exact_mut(out_w))
            .zip(hf.chunks_exact_mut(out_w));
        for ((xr, hr), fr) in rows {
            let (lo, hi) = match interior {
                Some((lo, hi, c0, kw, sw)) => {
                    let (out, first) = (&mut hr[lo..hi], &mut fr[lo..hi]);
                    match (kw, sw) {
                        // Kernel width 1 (a pool down the columns only, e.g. 2 x 1 in
                        // text recognizers): the row pass is a copy.
                        (1, 1) => window_max::<T, 1, 1>(xr, c0, out, first),
                        (2, 2) => window_max::<T, 2, 2>(xr, c0, out, first),
                        (3, 2) => window_max::<T, 3, 2>(xr, c0, out, first),
                        (3, 1) => window_max::<T, 3, 1>(xr, c0, out, first),
                        (2, 1) => window_max::<T, 2, 1>(xr, c0, out, first),
                        _ => {
                            for (i, (o, f)) in out.iter_mut().zip(first).enumerate() {
                                let b = c0 + i * sw;
                                *o = max_of::<T>(xr[b..b + kw].iter().copied());
                                *f = xr[b].load();
                            }
                        }
                    }
                    (lo, hi)
                }
                None => (0, 0),
            };
            for ow in (0..lo).chain(hi..out_w) {
                let cols = cols_of.of(ow);
                hr[ow] = max_of::<T>(cols.iter().map(|&c| xr[c]));
                fr[ow] = cols.first().map_or(neg, |&c| xr[c].load());
            }
        }
        for (oh, yr) in yp.chunks_exact_mut(out_w).enumerate() {
            let Some((&r0, rest)) = rows_of.of(oh).split_first() else {
                yr.iter_mut().for_each(|o| *o = T::store(neg));
                continue;
            };
            let row = |off: usize| off / w_in * out_w..(off / w_in + 1) * out_w;
            acc.clear();
            acc.extend_from_slice(&h[row(r0)]);
            for &r in rest {
                // A select and an unconditional store: the loop vectorizes (a conditional
                // store does not).
                for (m, &v) in acc.iter_mut().zip(&h[row(r)]) {
                    *m = if v > *m { v } else { *m };
                }
            }
            // The window's first tap (its first row's): a NaN there is the result.
            for ((o, &m), &f) in yr.iter_mut().zip(acc.iter()).zip(&hf[row(r0)]) {
                *o = T::store(if f.is_nan() { f } else { m });
            }
        }
    }
}

simd_fn! {
    /// One plane `xp` into `yp` of a 2-D AveragePool, separable as [`max_plane_separable`]:
    /// each input row's window sums at every output column into `h` (input rows x output
    /// columns), then each output row as the sum of its window's rows of `h`, divided by the
    /// window's count (its taps inside, or inside the padded extent with
    /// `count_include_pad`). Interior columns at stride 1 sum shifted runs of the row, a loop
    /// that vectorizes. The sum of a window is its rows' sums added in row order (the direct
    /// loop added tap by tap: the same taps, rounded in another order). The per-output loop
    /// over the tap tables it replaces took 7.4x ONNX Runtime's time on 8x64x56x56 (3x3, stride
    /// 1, padded).
    pub(super) fn avg_plane_separable<T: PoolElem>(
        xp: &[T],
        geometry: &Separable<'_>,
        count_include_pad: bool,
        h: &mut [T::C],
        acc: &mut Vec<T::C>,
        yp: &mut [T],
    ) {
        let Separable {
            w_in,
            rows_of,
            cols_of,
            out_w,
            fast,
            interior,
        } = *geometry;
        let zero = <T::C as Arith>::ZERO;
        // Columns `lo..hi` summed as shifted runs (stride 1), the others tap by tap.
        let (lo, hi, c0, kw) = match (interior, fast) {
            (Some((lo, hi, c0)), Some((kw, 1))) => (lo, hi, c0, kw),
            _ => (0, 0, 0, 0),
        };
        for (xr, hr) in xp.chunks_exact(w_in.max(1)).zip(h.chunks_exact_mut(out_w.max(1))) {
            if hi > lo {
                let out = &mut hr[lo..hi];
                let n = out.len();
                for (o, &v) in out.iter_mut().zip(&xr[c0..c0 + n]) {
                    *o = v.load();
                }
                for k in 1..kw {
                    for (o, &v) in out.iter_mut().zip(&xr[c0 + k..c0 + k + n]) {
                        *o += v.load();
                    }
                }
            }
            for ow in (0..lo).chain(hi..out_w) {
                let mut sum = zero;
                for &c in cols_of.of(ow) {
                    sum += xr[c].load();
                }
                hr[ow] = sum;
            }
        }
        // `acc`: one output row's sums, then each column's count of taps (as numbers, so
        // that the division loop vectorizes).
        acc.clear();
        acc.resize(2 * out_w, zero);
        let (sums, cols_n) = acc.split_at_mut(out_w);
        for (ow, n) in cols_n.iter_mut().enumerate() {
            let taps = if count_include_pad {
                cols_of.padded[ow]
            } else {
                cols_of.of(ow).len()
            };
            *n = <T::C as Real>::from_usize(taps);
        }
        for (oh, yr) in yp.chunks_exact_mut(out_w.max(1)).enumerate() {
            let rows = rows_of.of(oh);
            sums.fill(zero);
            for &r in rows {
                let hr = &h[r / w_in.max(1) * out_w..][..out_w];
                for (a, &v) in sums.iter_mut().zip(hr) {
                    *a += v;
                }
            }
            let rows_n = <T::C as Real>::from_usize(if count_include_pad {
                rows_of.padded[oh]
            } else {
                rows.len()
            });
            // The window's count, at least 1 (an empty window's sum, 0, stays 0): exact
            // products of small integers, the divisor the direct loop used.
            let one = <T::C as Arith>::ONE;
            for ((y, &a), &c) in yr.iter_mut().zip(sums.iter()).zip(cols_n.iter()) {
                let n = rows_n * c;
                *y = T::store(a / if n < one { one } else { n });
            }
        }
    }
}

simd_fn! {
    /// One plane `xp` into `yp` for a window one column wide that takes every column as it
    /// is (kernel width, column stride and dilation 1, no column padding: a text
    /// recognizer's 2 x 1 pools): each output row the elementwise maximum of its window's
    /// input rows, read in place. The separable passes copied every row into scratch first,
    /// and their per-plane set-up outweighed the work on such small planes (2-8 rows of 32:
    /// 10x ONNX Runtime's time per node).
    ///
    /// NaN as the direct loop: the window's first row starts the maximum, a later value
    /// replaces it only when greater (so a NaN in the first row stays, a later one is
    /// passed over).
    pub(super) fn max_plane_rows<T: PoolElem>(
        xp: &[T],
        rows_of: &Taps,
        out_w: usize,
        acc: &mut Vec<T::C>,
        yp: &mut [T],
    ) {
        for (oh, yr) in yp.chunks_exact_mut(out_w.max(1)).enumerate() {
            let Some((&r0, rest)) = rows_of.of(oh).split_first() else {
                // A window wholly in the padding.
                yr.iter_mut()
                    .for_each(|o| *o = T::store(<T::C as Real>::NEG_INFINITY));
                continue;
            };
            acc.clear();
            acc.extend(xp[r0..r0 + out_w].iter().map(|v| v.load()));
            for &r in rest {
                for (m, &v) in acc.iter_mut().zip(&xp[r..r + out_w]) {
                    let v = v.load();
                    *m = if v > *m { v } else { *m };
                }
            }
            for (o, &m) in yr.iter_mut().zip(acc.iter()) {
                *o = T::store(m);
            }
        }
    }
}

/// The maximum of the taps that are not NaN (-∞ when there is none).
#[inline(always)]
fn max_of<T: PoolElem>(taps: impl Iterator<Item = T>) -> T::C {
    let mut m = <T::C as Real>::NEG_INFINITY;
    for v in taps {
        let v = v.load();
        m = if v > m { v } else { m };
    }
    m
}

/// `out[i]` = [`max_of`] `x[start + i * S..][..K]` and `first[i]` = `x[start + i * S]`: a
/// kernel width and stride known at compile time, so that the loop vectorizes.
#[inline(always)]
fn window_max<T: PoolElem, const K: usize, const S: usize>(
    x: &[T],
    start: usize,
    out: &mut [T::C],
    first: &mut [T::C],
) {
    let need = out.len().saturating_sub(1) * S + K;
    let x = &x[start..start + need];
    for (i, (o, f)) in out.iter_mut().zip(first).enumerate() {
        *o = max_of::<T>(x[i * S..i * S + K].iter().copied());
        *f = x[i * S].load();
    }
}
