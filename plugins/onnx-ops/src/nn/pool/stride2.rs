//! 2-D f32 MaxPool without indices whose windows step 2 columns and span 2 or 3 (the 3x3/2
//! pools of ResNet and SqueezeNet, the 2x2/2 of VGG-style nets), in AVX-512: each output row
//! 16 outputs at a time, their windows' rows folded into maxima per input column as loaded,
//! then split into even and odd columns (3 permutes per 16 outputs) and folded across. On
//! AVX alone the same, 8 outputs at a time ([`interior_avx`]).
//!
//! The separable loop ([`super::separable`]) makes two passes through a scratch of input rows
//! x output columns (50 KiB per 112x112 plane, past L1) with short loops per 56-wide row:
//! ResNet-50's 64x112x112 pool took 0.45 ms at one thread against ONNX Runtime's 0.14 (its
//! NCHWc pool). One pass over the window rows reads each input row once per output row it
//! feeds and writes each output once.
//!
//! NaN as the direct loop: a window's first tap starts the maximum (a NaN there stays) and a
//! later tap replaces it only when greater. `maxps(v, m)` is `v > m ? v : m` (a NaN `v` leaves
//! `m`, a NaN `m` stays): the folds start from -inf, so they skip NaN taps, and a NaN first
//! tap is put back at the end. Ties keep the earlier operand, but the rows are folded before
//! the columns: a window whose largest taps are 0.0 and -0.0 in different rows may give either
//! zero (the direct loop gives the first in row-major order).

use super::separable::Separable;

/// `yp` (one output plane, `rows_of.len() x out_w`) from `xp` (one input plane), where the
/// geometry's columns step 2 over windows of 2 or 3 and the CPU has AVX-512 or AVX; `false`
/// (nothing written) otherwise.
pub(super) fn max_plane_stride2_f32(xp: &[f32], geometry: &Separable<'_>, yp: &mut [f32]) -> bool {
    max_rows_stride2_f32(xp, geometry, 0, yp)
}

/// Whether [`max_rows_stride2_f32`] takes `geometry` on this CPU.
pub(super) fn takes(geometry: &Separable<'_>) -> bool {
    matches!(geometry.fast, Some((2 | 3, 2))) && super::fast_loops().is_some()
}

/// [`max_plane_stride2_f32`] for the output rows from `first` that `out` holds (whole rows;
/// only the input rows their windows read are read): a fused convolution pools a band of
/// rows at a time while they are in cache.
pub(super) fn max_rows_stride2_f32(
    xp: &[f32],
    geometry: &Separable<'_>,
    first: usize,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let (true, Some((kw, _)), Some(avx512)) =
        (takes(geometry), geometry.fast, super::fast_loops())
    {
        // SAFETY: the CPU has AVX-512 F, or AVX (checked).
        unsafe {
            if avx512 {
                rows_avx512(xp, geometry, kw, first, out)
            } else {
                rows_avx(xp, geometry, kw, first, out)
            }
        };
        return true;
    }
    let _ = (xp, geometry, first, out);
    false
}

/// [`max_rows_stride2_f32`] once checked, on AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(
    xp: &[f32],
    geometry: &Separable<'_>,
    kw: usize,
    first: usize,
    out: &mut [f32],
) {
    // SAFETY: AVX-512 F (caller).
    rows(
        xp,
        geometry,
        kw,
        first,
        out,
        |xp, rows, c0, three, yr| unsafe { interior(xp, rows, c0, three, yr) },
    )
}

/// [`max_rows_stride2_f32`] once checked, on AVX (8 outputs per vector: ResNet-style and
/// SqueezeNet's 3x3/2 pools had run the separable loop's two passes on AVX2 CPUs).
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn rows_avx(xp: &[f32], geometry: &Separable<'_>, kw: usize, first: usize, out: &mut [f32]) {
    // SAFETY: AVX (caller).
    rows(
        xp,
        geometry,
        kw,
        first,
        out,
        |xp, rows, c0, three, yr| unsafe { interior_avx(xp, rows, c0, three, yr) },
    )
}

/// The output columns whose windows lie wholly inside the row through `interior`, the others
/// (pads, a ceil-mode edge) tap by tap.
#[inline(always)]
fn rows(
    xp: &[f32],
    geometry: &Separable<'_>,
    kw: usize,
    first: usize,
    out: &mut [f32],
    interior: impl Fn(&[f32], &[usize], usize, bool, &mut [f32]),
) {
    let Separable {
        rows_of,
        cols_of,
        out_w,
        ..
    } = *geometry;
    // The interior columns `lo..hi`, the first one's window from column `c0`.
    let (lo, hi, c0) = geometry.interior.unwrap_or((0, 0, 0));
    for (i, yr) in out.chunks_exact_mut(out_w.max(1)).enumerate() {
        let rows = rows_of.of(first + i);
        if rows.is_empty() {
            yr.fill(f32::NEG_INFINITY);
            continue;
        }
        if hi > lo {
            interior(xp, rows, c0, kw == 3, &mut yr[lo..hi]);
        }
        for ow in (0..lo).chain(hi..out_w) {
            let cols = cols_of.of(ow);
            let mut taps = rows
                .iter()
                .flat_map(|&r| cols.iter().map(move |&c| xp[r + c]));
            yr[ow] = match taps.next() {
                Some(first) => taps.fold(first, |m, v| if v > m { v } else { m }),
                None => f32::NEG_INFINITY,
            };
        }
    }
}

/// For `n` outputs in vectors of `lanes` (the taps of `lanes` outputs end `2 * lanes + 2`
/// floats after their first): how many outputs whole-register loads may compute, and each
/// window row's first tap (`rows` at offsets of `xp`, from column `c0`; at most 8 rows, else
/// none). Every vector but the last reads within the row's `span` (another `lanes` outputs
/// follow); the last too where the plane holds its `2 * lanes + 2` floats (it then reads into
/// the next row, whose values feed only lanes past `n`, never stored).
fn whole_vectors(
    xp: &[f32],
    (rows, c0): (&[usize], usize),
    n: usize,
    span: usize,
    lanes: usize,
) -> (usize, [*const f32; 8]) {
    let vectors = n.div_ceil(lanes);
    let last_end = 2 * lanes * vectors.saturating_sub(1) + 2 * lanes + 2;
    let mut starts = [std::ptr::null::<f32>(); 8];
    let mut row_starts = |len: usize| {
        rows.len() <= starts.len()
            && rows.iter().zip(starts.iter_mut()).all(|(&r, s)| {
                match xp.get(r + c0..).and_then(|x| x.get(..len)) {
                    Some(x) => {
                        *s = x.as_ptr();
                        true
                    }
                    None => false,
                }
            })
    };
    let whole = if row_starts(last_end.max(span)) {
        vectors * lanes
    } else if row_starts(span) {
        n.saturating_sub(1) / lanes * lanes
    } else {
        0
    };
    (whole, starts)
}

/// `out[i]` = the maximum over the rows at offsets `rows` of columns `c0 + 2i`, `c0 + 2i + 1`
/// (and `c0 + 2i + 2` when `three`), the first row's `c0 + 2i` first.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interior(xp: &[f32], rows: &[usize], c0: usize, three: bool, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len();
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    // Every tap a row's windows read: the bounds the masked loads stay inside.
    let span = (n - 1) * 2 + if three { 3 } else { 2 };
    // The 16 floats at x[at..], masked to x's end (a mask of 0 reads nothing, so the pointer
    // may lie past the end: `wrapping_add` forms it without asserting otherwise).
    let load = |x: &[f32], at: usize| {
        let avail = x.len().saturating_sub(at).min(16);
        let mask = ((1u32 << avail) - 1) as __mmask16;
        // SAFETY: masked to `x` (AVX-512 F: caller).
        unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr().wrapping_add(at)) }
    };
    // Whole-register loads from each row's pointer: computing a mask and a checked slice per
    // load, as the masked loop below does, cost three times the loads themselves (64x111x111
    // at batch 8: 3.3 ms against ONNX Runtime's 0.66). Every vector but the last reads within
    // the row's `span` (the taps of its 16 outputs end at `p + 34` at most, while 16 more
    // outputs follow). The last vector's loads run whole too when the plane holds the 34
    // floats from its `p`: they reach into the next row, whose values only feed the lanes
    // past `n`, which the masked store drops. That is every row but a plane's last one or
    // two, so 27-wide output rows (SqueezeNet's 128x55x55 pool) no longer take one of their
    // two vectors masked.
    let (whole, starts) = whole_vectors(xp, (rows, c0), n, span, 16);
    let starts = &starts[..rows.len().min(starts.len())];
    // Each window row's taps at the 32 (34) columns of 16 outputs are folded down the rows as
    // loaded, and split into even and odd columns once per 16 outputs: 3 permutes, where
    // splitting every row's vectors took 3 per window row (9 for a 3x3 window). The row
    // folds start from -inf and skip NaN taps; a NaN first tap (row 0, column `c0 + 2i`) is
    // put back at the end.
    let neg = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..whole).step_by(16) {
        let p = 2 * i;
        let (mut va, mut vb, mut vc, mut vd) = (neg, neg, neg, neg);
        let (mut a0, mut b0) = (neg, neg);
        for (k, &x) in starts.iter().enumerate() {
            // SAFETY: `p + 34 <= span` (another 16 outputs follow: `2 * (i + 16) + 2 <=
            // span`) or, when `whole` covers the last vector, `p + 34 <= last_end`: every
            // load lies in the row's checked floats.
            unsafe {
                let (a, b) = (_mm512_loadu_ps(x.add(p)), _mm512_loadu_ps(x.add(p + 16)));
                if k == 0 {
                    (a0, b0) = (a, b);
                }
                va = _mm512_max_ps(a, va);
                vb = _mm512_max_ps(b, vb);
                if three {
                    vc = _mm512_max_ps(_mm512_loadu_ps(x.add(p + 2)), vc);
                    vd = _mm512_max_ps(_mm512_loadu_ps(x.add(p + 18)), vd);
                }
            }
        }
        let mut m = _mm512_max_ps(
            _mm512_permutex2var_ps(va, odd, vb),
            _mm512_permutex2var_ps(va, even, vb),
        );
        if three {
            m = _mm512_max_ps(_mm512_permutex2var_ps(vc, even, vd), m);
        }
        // Any NaN among row 0's 32 columns (unordered: either operand NaN).
        if _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a0, b0) != 0 {
            let first = _mm512_permutex2var_ps(a0, even, b0);
            m = _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(first, first), first);
        }
        if i + 16 <= n {
            // SAFETY: outputs `i..i + 16` lie in `out`.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(i), m) };
        } else {
            let mask = ((1u32 << (n - i)) - 1) as __mmask16;
            // SAFETY: masked to `out`'s first `n` elements (`i < n < i + 16`).
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, m) };
        }
    }
    let done = whole.min(n);
    for i in (done..n).step_by(16) {
        let p = 2 * i;
        let mut m = _mm512_setzero_ps();
        for (k, &r) in rows.iter().enumerate() {
            let x = &xp[r + c0..][..span];
            let (a, b) = (load(x, p), load(x, p + 16));
            let e = _mm512_permutex2var_ps(a, even, b);
            m = if k == 0 { e } else { _mm512_max_ps(e, m) };
            m = _mm512_max_ps(_mm512_permutex2var_ps(a, odd, b), m);
            if three {
                let e2 = _mm512_permutex2var_ps(load(x, p + 2), even, load(x, p + 18));
                m = _mm512_max_ps(e2, m);
            }
        }
        let mask = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
        // SAFETY: masked to `out`'s first `n` elements.
        unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, m) };
    }
}

/// [`interior`] on AVX, 8 outputs per vector: the same row folds from -inf, the even and odd
/// columns split by in-lane shuffles (`0x88`, `0xDD`) and put in order once per 8 outputs by
/// one cross-lane permute (a permutation commutes with the maxima), the same NaN rule. The
/// outputs past the last whole vector (a plane's last row or two) tap by tap in that order.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn interior_avx(xp: &[f32], rows: &[usize], c0: usize, three: bool, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len();
    // Every tap a row's windows read.
    let span = (n - 1) * 2 + if three { 3 } else { 2 };
    // As `interior`: whole-register loads from each row's pointer, every vector but the last
    // inside the row's `span` (the taps of 8 outputs end at `p + 18`, while 8 more outputs
    // follow), the last too when the plane holds its 18 floats.
    let (whole, starts) = whole_vectors(xp, (rows, c0), n, span, 8);
    let starts = &starts[..rows.len().min(starts.len())];
    let neg = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..whole).step_by(8) {
        let p = 2 * i;
        let (mut va, mut vb, mut vc, mut vd) = (neg, neg, neg, neg);
        let (mut a0, mut b0) = (neg, neg);
        for (k, &x) in starts.iter().enumerate() {
            // SAFETY: `p + 18 <= span` (another 8 outputs follow) or, when `whole` covers the
            // last vector, `p + 18 <= last_end`: every load lies in the row's checked floats.
            unsafe {
                let (a, b) = (_mm256_loadu_ps(x.add(p)), _mm256_loadu_ps(x.add(p + 8)));
                if k == 0 {
                    (a0, b0) = (a, b);
                }
                va = _mm256_max_ps(a, va);
                vb = _mm256_max_ps(b, vb);
                if three {
                    vc = _mm256_max_ps(_mm256_loadu_ps(x.add(p + 2)), vc);
                    vd = _mm256_max_ps(_mm256_loadu_ps(x.add(p + 10)), vd);
                }
            }
        }
        // Even columns `[0 2 8 10 | 4 6 12 14]`, odd ones likewise: in order after the
        // permute below.
        let mut m = _mm256_max_ps(
            _mm256_shuffle_ps::<0xDD>(va, vb),
            _mm256_shuffle_ps::<0x88>(va, vb),
        );
        if three {
            m = _mm256_max_ps(_mm256_shuffle_ps::<0x88>(vc, vd), m);
        }
        let first = _mm256_shuffle_ps::<0x88>(a0, b0);
        m = _mm256_blendv_ps(m, first, _mm256_cmp_ps::<_CMP_UNORD_Q>(first, first));
        let m = _mm256_castpd_ps(pairs_in_order(_mm256_castps_pd(m)));
        if i + 8 <= n {
            // SAFETY: outputs `i..i + 8` lie in `out`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), m) };
        } else {
            let mut v = [0f32; 8];
            // SAFETY: 8 floats.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), m) };
            out[i..].copy_from_slice(&v[..n - i]);
        }
    }
    for (i, o) in out.iter_mut().enumerate().skip(whole.min(n)) {
        let col = |r: usize, j: usize| xp[r + c0 + 2 * i + j];
        // Each column folded down the rows from -inf (`maxps(v, m)`: v > m ? v : m).
        let fold = |j: usize| {
            rows.iter()
                .map(|&r| col(r, j))
                .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
        };
        let (a, b) = (fold(0), fold(1));
        let mut m = if b > a { b } else { a };
        if three {
            let c = fold(2);
            m = if c > m { c } else { m };
        }
        *o = match rows.first() {
            Some(&r) if col(r, 0).is_nan() => col(r, 0),
            _ => m,
        };
    }
}

/// The 64-bit lanes `[0 2 1 3]` of `v` (`vpermpd` is AVX2; on AVX alone: swap the middle
/// two through the 128-bit halves).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn pairs_in_order(v: std::arch::x86_64::__m256d) -> std::arch::x86_64::__m256d {
    use std::arch::x86_64::*;
    // lo = [0 1], hi = [2 3] -> [0 2 | 1 3].
    let lo = _mm256_castpd256_pd128(v);
    let hi = _mm256_extractf128_pd::<1>(v);
    let a = _mm_unpacklo_pd(lo, hi);
    let b = _mm_unpackhi_pd(lo, hi);
    _mm256_insertf128_pd::<1>(_mm256_castpd128_pd256(a), b)
}
