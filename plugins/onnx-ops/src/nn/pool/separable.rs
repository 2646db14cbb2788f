//! 2-D MaxPool without indices, separable: first each input row's window maximum at every
//! output column, then each output row as the elementwise maximum of its window's rows. The
//! direct loop reads `kh * kw` taps per output through the tap tables; this reads `kw` per
//! input row and output column (with the interior columns in a loop of constant kernel width
//! and stride) and `kh` contiguous rows per output row, loops that vectorize.
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
        } = *geometry;
        let neg = <T::C as Real>::NEG_INFINITY;
        let (h, hf) = h.split_at_mut(h.len() / 2);
        // The output columns whose windows lie wholly inside the row, with their first column.
        let interior = fast.and_then(|(kw, sw)| {
            let lo = (0..out_w).find(|&ow| cols_of.of(ow).len() == kw)?;
            let hi = (lo..out_w)
                .find(|&ow| cols_of.of(ow).len() != kw)
                .unwrap_or(out_w);
            Some((lo, hi, *cols_of.of(lo).first()?, kw, sw))
        });
        let rows = xp
            .chunks_exact(w_in.max(1))
            .zip(h.chunks_exact_mut(out_w))
            .zip(hf.chunks_exact_mut(out_w));
        for ((xr, hr), fr) in rows {
            let (lo, hi) = match interior {
                Some((lo, hi, c0, kw, sw)) => {
                    let (out, first) = (&mut hr[lo..hi], &mut fr[lo..hi]);
                    if !T::row_max_stride2(xr, c0, kw, sw, out, first) {
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

/// [`window_max`] for f32, kernel 2 or 3 and stride 2, in AVX-512: 32 consecutive floats
/// split into the 16 even and 16 odd ones with one permute each (the compiler runs the
/// strided loop one float at a time), for 16 outputs at once. The last block's loads and
/// stores are masked, so nothing outside `x[c0..]`'s windows or `out` is touched. `false`
/// (nothing written) for another window or a CPU without AVX-512.
pub(super) fn row_max_stride2_f32(
    x: &[f32],
    c0: usize,
    kw: usize,
    sw: usize,
    out: &mut [f32],
    first: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if sw == 2 && matches!(kw, 2 | 3) && crate::simd::has_avx512() {
        let n = out.len().min(first.len());
        if n == 0 {
            return true;
        }
        // Every input the windows read, whole: the bounds the masked loads stay inside.
        let x = &x[c0..c0 + (n - 1) * 2 + kw];
        // SAFETY: the CPU has AVX-512 F (checked); the kernel's loads and stores are masked
        // to `x` and to the first `n` elements of `out` and `first`.
        unsafe { row_max_stride2_avx512(x, kw == 3, &mut out[..n], &mut first[..n]) };
        return true;
    }
    let _ = (x, c0, kw, sw, out, first);
    false
}

/// `out[i]` = max of `x[2i], x[2i + 1]` (and `x[2i + 2]` when `three`), `first[i]` = `x[2i]`,
/// for `out.len()` outputs; `x` holds exactly the taps read and `first` is as long as `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_max_stride2_avx512(x: &[f32], three: bool, out: &mut [f32], first: &mut [f32]) {
    use std::arch::x86_64::*;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    let neg = _mm512_set1_ps(f32::NEG_INFINITY);
    let n = out.len();
    // The 16 floats at x[at..], masked to x's end (a mask of 0 reads nothing, so the pointer
    // may lie past the end: `wrapping_add` forms it without asserting otherwise).
    let load = |at: usize| {
        let avail = x.len().saturating_sub(at).min(16);
        let mask = ((1u32 << avail) - 1) as __mmask16;
        _mm512_maskz_loadu_ps(mask, x.as_ptr().wrapping_add(at))
    };
    let mut i = 0;
    while i < n {
        let p = 2 * i;
        let (a, b) = (load(p), load(p + 16));
        let e = _mm512_permutex2var_ps(a, even, b);
        let o = _mm512_permutex2var_ps(a, odd, b);
        let mut m = _mm512_max_ps(o, _mm512_max_ps(e, neg));
        if three {
            let e2 = _mm512_permutex2var_ps(load(p + 2), even, load(p + 18));
            m = _mm512_max_ps(e2, m);
        }
        let mask = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, m);
        _mm512_mask_storeu_ps(first.as_mut_ptr().add(i), mask, e);
        i += 16;
    }
}
