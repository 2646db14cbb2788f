//! The channels-last depthwise interior with AVX-512 VNNI: four taps per `vpdpbusd`.
//!
//! A depthwise sum runs over taps, not channels, so the dot-product instructions (which add
//! four adjacent byte products into each i32 lane) do not apply to x as it lies in memory
//! (channels adjacent). Here four taps' 64-byte rows of x are interleaved by two rounds of
//! in-lane unpacks into four registers whose every i32 lane holds one channel's four tap
//! bytes, and one `vpdpbusd` per register adds their four products against weights stored
//! the same way. Per 64 channels and 9 taps: 9 loads, 18 unpacks and 12 dot products, where
//! the 16-channel `vpmaddwd` loop issues 36 widenings, 16 shifts, 16 blends, 20 multiply-adds
//! and 20 adds. MobileNetV2-QDQ's depthwise layers, one thread: 1.28 ms with that loop,
//! 0.99 ms with this one and the border positions below (ONNX Runtime 1.02; measured).
//!
//! A window reaching into the padding runs the same loop with per-tap addresses, the taps
//! in the padding reading a run of zero-point bytes: the per-tap `x - zx` border loop took
//! about three times an interior position's time (15 % of a 56x56 layer's for 7 % of its
//! positions).
//!
//! The unpacks leave the channels permuted: register `r`'s lane `d = 4 * l + j` holds
//! channel `16 * l + 4 * r + j` of the block (`l` the 128-bit lane). The weights, biases and
//! multipliers are stored in that order, and one `vpermb` restores the channel order of the
//! 64 output bytes. Needs x as u8 (i8 is moved to u8 by flipping its top bit, and the zero
//! point by 128) and the zero-point-shifted weights in i8.

use opreg_sdk::prelude::*;

/// Channels per block: four 128-bit lanes of 16 bytes.
pub(super) const BLOCK: usize = 64;

/// The position of channel `k` (of a block) in the permuted order: register `r`'s lane `d`.
const fn slot(k: usize) -> usize {
    let (l, r, j) = (k / 16, k % 16 / 4, k % 4);
    r * 16 + 4 * l + j
}

/// `vpermb`'s indices back to channel order: output byte `k` of a block is byte `slot(k)`
/// of the four requantized registers laid end to end.
const ORDER: [u8; BLOCK] = {
    let mut order = [0u8; BLOCK];
    let mut k = 0;
    while k < BLOCK {
        order[k] = slot(k) as u8;
        k += 1;
    }
    order
};

/// Depthwise weights for the VNNI loop, prepared once with the tap-major ones: per block of
/// 64 channels and group of four taps, four registers of `i8 x 4` lanes (`w[tap 4q + k]` in
/// byte `k`, 0 past the last tap), in the permuted channel order.
#[derive(Clone)]
pub(super) struct Quads {
    w: Vec<i32>,
    blocks: usize,
    quads: usize,
}

impl Quads {
    /// From weights `[c, taps]` with their zero point subtracted; `None` where a shifted
    /// weight does not fit in i8 or there is not one whole block of channels.
    pub(super) fn new(shifted: &[i32], c: usize, taps: usize) -> Option<Self> {
        let (blocks, quads) = (c / BLOCK, taps.div_ceil(4));
        if blocks == 0 || taps == 0 || shifted.len() < c.checked_mul(taps)? {
            return None;
        }
        if shifted.iter().any(|&v| i8::try_from(v).is_err()) {
            return None;
        }
        let mut w = opreg_sdk::alloc::try_vec(blocks * quads * BLOCK, 0i32).ok()?;
        for (ch, row) in shifted.chunks_exact(taps).take(blocks * BLOCK).enumerate() {
            let (b, k) = (ch / BLOCK, ch % BLOCK);
            for (t, &v) in row.iter().enumerate() {
                let at = (b * quads + t / 4) * BLOCK + slot(k);
                w[at] |= i32::from(v as i8 as u8) << (8 * (t % 4));
            }
        }
        Some(Quads { w, blocks, quads })
    }

    /// The tap offsets grouped as the weights are: four per group, the last group padded
    /// with the first offset (its weights are zero there).
    pub(super) fn groups(&self, offsets: &[usize]) -> Result<Vec<[usize; 4]>, PluginError> {
        let mut groups = opreg_sdk::alloc::try_with_capacity(self.quads)?;
        let first = offsets.first().copied().unwrap_or(0);
        groups.extend(
            offsets
                .chunks(4)
                .map(|g| std::array::from_fn(|k| g.get(k).copied().unwrap_or(first))),
        );
        Ok(groups)
    }

    /// The channels this loop covers: the whole blocks.
    pub(super) fn channels(&self) -> usize {
        self.blocks * BLOCK
    }

    /// Per-channel values (`c` of them) in the permuted order, for the whole blocks.
    pub(super) fn permute<T: Copy + Default>(&self, v: &[T]) -> Result<Vec<T>, PluginError> {
        let mut out = opreg_sdk::alloc::try_vec(self.channels(), T::default())?;
        for (ch, &x) in v.iter().take(self.channels()).enumerate() {
            out[ch / BLOCK * BLOCK + slot(ch % BLOCK)] = x;
        }
        Ok(out)
    }
}

/// What the VNNI loop needs besides the row's geometry, per run.
pub(super) struct QuadRows<'a> {
    pub w: &'a Quads,
    /// Per group of four taps, their offsets in x from the window's first position (a
    /// missing tap reads the first one's bytes, against zero weights).
    pub groups: Vec<[usize; 4]>,
    /// Per channel, permuted: the bias less the x zero point's share (`(zx + 128) * Σ w`
    /// for i8 x, which the loop reads as `x + 128`).
    pub inner: Vec<i32>,
    /// The requantization multipliers, permuted.
    pub mult: Vec<f32>,
    /// The whole blocks' worth of x's zero point (as its byte), read for taps in the
    /// padding.
    pub pad: Vec<u8>,
}

impl QuadRows<'_> {
    /// Whether these operands hold what both loops read for `c` channels under `taps` taps:
    /// whole blocks within `c`, one group of weights per four taps, and a permuted bias,
    /// multiplier and padding byte for every channel of the blocks.
    fn fits(&self, c: usize, taps: usize) -> bool {
        let (w, n) = (self.w, self.w.channels());
        n <= c
            && w.quads == taps.div_ceil(4)
            && w.w.len() >= w.blocks * w.quads * BLOCK
            && self.inner.len() >= n
            && self.mult.len() >= n
            && self.pad.len() >= n
    }
}

/// Whether the CPU runs [`interior`]: AVX-512 with VNNI (the dot products) and VBMI (the
/// byte permute).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::simd::has_avx512()
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
pub(super) use wide::{border, interior};

#[cfg(target_arch = "x86_64")]
mod wide {
    use super::super::{wide::requantize16, Rows, LANES};
    use super::{QuadRows, Quads, BLOCK, ORDER};
    use std::arch::x86_64::*;

    /// Positions per pass: each group's weights are loaded once for this many (2 x 4
    /// accumulators in registers; 4 measured no faster).
    const POSITIONS: usize = 4;

    /// Four taps' 64 bytes at `t[k]` interleaved into four registers of one channel's four
    /// bytes per lane (see the module's permuted order).
    ///
    /// # Safety
    /// Each `t[k]` must be readable for 64 bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn gather<const SIGNED: bool>(t: [*const u8; 4]) -> [__m512i; 4] {
        let flip = _mm512_set1_epi8(-128);
        let t = t.map(|t| {
            // SAFETY: the caller's contract.
            let v = unsafe { _mm512_loadu_si512(t.cast()) };
            if SIGNED {
                _mm512_xor_si512(v, flip)
            } else {
                v
            }
        });
        let (a, b) = (
            _mm512_unpacklo_epi8(t[0], t[1]),
            _mm512_unpackhi_epi8(t[0], t[1]),
        );
        let (c, d) = (
            _mm512_unpacklo_epi8(t[2], t[3]),
            _mm512_unpackhi_epi8(t[2], t[3]),
        );
        [
            _mm512_unpacklo_epi16(a, c),
            _mm512_unpackhi_epi16(a, c),
            _mm512_unpacklo_epi16(b, d),
            _mm512_unpackhi_epi16(b, d),
        ]
    }

    /// `acc[r] += v[r] . w[r]` for one group's four registers: group `g` of block `b`.
    ///
    /// # Safety
    /// `g < w.quads` and `b < w.blocks` (the weights hold `blocks * quads * 64` lanes).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn weights(w: &Quads, b: usize, g: usize) -> [__m512i; 4] {
        let wp = w.w.as_ptr();
        // SAFETY: `(b * quads + g) * 64 + 64 <= blocks * quads * 64 <= w.len()`.
        std::array::from_fn(|r| unsafe {
            _mm512_loadu_si512(wp.add((b * w.quads + g) * BLOCK + 16 * r).cast())
        })
    }

    /// One position's four registers of sums (channels `c0..c0 + 64`, permuted)
    /// requantized with `q.inner`, put back in channel order and stored at `dst`.
    ///
    /// # Safety
    /// `dst` must be writable for 64 bytes; `c0 + 64 <= q.inner.len(), q.mult.len()`
    /// (checked: short slices store zeros).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    #[inline]
    unsafe fn store(p: &Rows<'_>, q: &QuadRows<'_>, a: &[__m512i; 4], c0: usize, dst: *mut u8) {
        let part = |r: usize| {
            let at = c0 + 16 * r;
            let (Some(bias), Some(mult)) = (
                q.inner.get(at..).and_then(|s| s.first_chunk::<LANES>()),
                q.mult.get(at..).and_then(|s| s.first_chunk::<LANES>()),
            ) else {
                return _mm_setzero_si128();
            };
            requantize16(p.q, a[r], bias, mult)
        };
        let lo = _mm256_set_m128i(part(1), part(0));
        let hi = _mm256_set_m128i(part(3), part(2));
        let bytes = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
        // SAFETY: `ORDER` holds the 64 indices read.
        let order = unsafe { _mm512_loadu_si512(ORDER.as_ptr().cast()) };
        // SAFETY: the caller's contract.
        unsafe { _mm512_storeu_si512(dst.cast(), _mm512_permutexvar_epi8(order, bytes)) };
    }

    /// Output row `oh`'s windows inside x (columns `p.cols`), the whole blocks of 64
    /// channels: `Σ w * x` over the taps, requantized with `q.inner`, into `out` (the row).
    /// `false` where x, the weights or the row are shorter than the geometry says (the
    /// caller checked: never).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL, VNNI and VBMI ([`super::available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    pub(in crate::quant::conv) unsafe fn interior<const SIGNED: bool>(
        p: &Rows<'_>,
        q: &QuadRows<'_>,
        x: &[u8],
        oh: usize,
        out: &mut [u8],
    ) -> bool {
        let (c, win, w) = (p.c, &p.win, q.w);
        let (ow0, ow1) = p.cols;
        if ow0 >= ow1 || w.blocks == 0 {
            return true;
        }
        let step = win.sw * c;
        let max_off = q.groups.iter().flatten().copied().max().unwrap_or(0);
        let base0 = ((oh * win.sh - win.ph) * win.iw + ow0 * win.sw - win.pw) * c;
        let end = (ow1 - 1 - ow0)
            .checked_mul(step)
            .and_then(|v| v.checked_add(base0)?.checked_add(max_off)?.checked_add(c));
        if end.is_none_or(|e| e > x.len())
            || !q.fits(c, win.kh_n * win.kw_n)
            || w.quads != q.groups.len()
            || out.len() < ow1 * c
        {
            return false;
        }
        let xp = x.as_ptr();
        for b in 0..w.blocks {
            let c0 = b * BLOCK;
            let mut ow = ow0;
            while ow < ow1 {
                let n = POSITIONS.min(ow1 - ow);
                let base = base0 + (ow - ow0) * step + c0;
                let mut acc = [[_mm512_setzero_si512(); 4]; POSITIONS];
                for (g, o) in q.groups.iter().enumerate() {
                    // SAFETY: `g < quads` (checked above), `b < blocks`.
                    let wv = unsafe { weights(w, b, g) };
                    let one = |a: &mut [__m512i; 4], j: usize| {
                        // SAFETY: window `ow + j < ow1` reads x below `end <= x.len()`.
                        let v = unsafe { gather::<SIGNED>(o.map(|o| xp.add(base + j * step + o))) };
                        for r in 0..4 {
                            a[r] = _mm512_dpbusd_epi32(a[r], v[r], wv[r]);
                        }
                    };
                    if n == POSITIONS {
                        for (j, a) in acc.iter_mut().enumerate() {
                            one(a, j);
                        }
                    } else {
                        for (j, a) in acc.iter_mut().enumerate().take(n) {
                            one(a, j);
                        }
                    }
                }
                for (j, a) in acc.iter().enumerate().take(n) {
                    // SAFETY: `(ow + j) * c + c0 + 64 <= (ow1 - 1) * c + c <= out.len()`
                    // (c0 + 64 <= c); the biases and multipliers were checked above.
                    unsafe { store(p, q, a, c0, out.as_mut_ptr().add((ow + j) * c + c0)) };
                }
                ow += n;
            }
        }
        true
    }

    /// The window at output `(oh, ow)` reaching into the padding, the whole blocks of 64
    /// channels into `dst` (the position's `c` bytes): taps in the padding read `q.pad`
    /// (the zero point's bytes, whose share `q.inner` takes back), so that the sums are
    /// the interior's. `false` where a slice is shorter than the geometry says (never).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL, VNNI and VBMI ([`super::available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    pub(in crate::quant::conv) unsafe fn border<const SIGNED: bool>(
        p: &Rows<'_>,
        q: &QuadRows<'_>,
        x: &[u8],
        oh: usize,
        ow: usize,
        dst: &mut [u8],
    ) -> bool {
        let (c, win, w) = (p.c, &p.win, q.w);
        let taps = win.kh_n * win.kw_n;
        if !q.fits(c, taps) || dst.len() < c {
            return false;
        }
        // Per tap, where its channels start in x, or `None` in the padding.
        let at = |t: usize| -> Option<usize> {
            let (kh, kw) = (t / win.kw_n, t % win.kw_n);
            let y = win.row(oh, kh)?;
            let xx = (ow * win.sw + kw * win.dw).wrapping_sub(win.pw);
            if xx >= win.iw {
                return None;
            }
            let at = (y * win.iw + xx) * c;
            (at + c <= x.len()).then_some(at)
        };
        for b in 0..w.blocks {
            let c0 = b * BLOCK;
            let mut acc = [_mm512_setzero_si512(); 4];
            for g in 0..w.quads {
                // SAFETY: `g < quads`, `b < blocks`.
                let wv = unsafe { weights(w, b, g) };
                // SAFETY: a tap inside x reads `at + c0 + 64 <= at + c <= x.len()`; one in
                // the padding (or past the last tap, against zero weights) reads `pad`
                // from `c0`, below `channels() <= pad.len()`.
                let t: [*const u8; 4] = std::array::from_fn(|k| unsafe {
                    match (4 * g + k < taps).then(|| at(4 * g + k)).flatten() {
                        Some(at) => x.as_ptr().add(at + c0),
                        None => q.pad.as_ptr().add(c0),
                    }
                });
                // SAFETY: as above.
                let v = unsafe { gather::<SIGNED>(t) };
                for r in 0..4 {
                    acc[r] = _mm512_dpbusd_epi32(acc[r], v[r], wv[r]);
                }
            }
            // SAFETY: `c0 + 64 <= channels() <= c <= dst.len()`; biases, multipliers checked.
            unsafe { store(p, q, &acc, c0, dst.as_mut_ptr().add(c0)) };
        }
        true
    }
}
