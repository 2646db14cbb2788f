//! Depthwise 2-D integer convolution (one input channel per group: MobileNet's 3x3 layers):
//! a direct loop per output plane. Through im2col and the gemm, each of the hundreds of groups
//! is a product one column wide, and the quantized MobileNetV2 ran 4.7 times slower than the
//! float one (measured); here each plane is a few passes of `acc += w * (x - zx)` along
//! output rows, which vectorize for unit strides.

mod quads;

use super::Geometry;
use crate::util::numel;
use opreg_sdk::prelude::*;
use quads::{QuadRows, Quads};

/// Output positions accumulated at a time (a stack buffer: no allocation in the workers).
pub(super) const BLOCK: usize = 256;

/// The operands of one depthwise convolution.
pub(super) struct Depthwise<'a> {
    /// x's bytes (u8, or i8 as two's complement), NCHW.
    pub x: &'a [u8],
    pub x_signed: bool,
    pub x_zp: i32,
    /// W (`[m, 1, kh, kw]`) with its zero point subtracted.
    pub w: Vec<i32>,
    /// Per output channel, or none.
    pub bias: Option<&'a [i32]>,
}

/// A 2-D depthwise convolution's window, as both loops walk it.
struct Window {
    ih: usize,
    iw: usize,
    ow_n: usize,
    kh_n: usize,
    kw_n: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    ph: usize,
    pw: usize,
}

impl Window {
    fn of(g: &Geometry) -> Self {
        Window {
            ih: g.in_sp[0],
            iw: g.in_sp[1],
            ow_n: g.out_sp[1],
            kh_n: g.k_sp[0],
            kw_n: g.k_sp[1],
            sh: g.strides[0],
            sw: g.strides[1],
            dh: g.dilations[0],
            dw: g.dilations[1],
            ph: g.pad_begin[0],
            pw: g.pad_begin[1],
        }
    }

    /// The input row under kernel row `kh` at output row `oh`, or `None` in the padding.
    #[inline(always)]
    fn row(&self, oh: usize, kh: usize) -> Option<usize> {
        let y = (oh * self.sh + kh * self.dh).wrapping_sub(self.ph);
        (y < self.ih).then_some(y)
    }

    /// The output columns whose tap at kernel column `kw` lands inside the input (`ow * sw +
    /// kw * dw - pw` in `0..iw`), as `(lo, hi)`.
    #[inline(always)]
    fn columns(&self, kw: usize) -> (usize, usize) {
        let off = kw * self.dw;
        let lo = self.pw.saturating_sub(off).div_ceil(self.sw);
        let hi = (self.iw + self.pw)
            .checked_sub(off + 1)
            .map_or(0, |last| (last / self.sw + 1).min(self.ow_n));
        (lo, hi.max(lo))
    }
}

impl Geometry {
    /// Whether [`Geometry::run_depthwise`] takes this convolution: 2-D, one input channel per
    /// group.
    pub(super) fn depthwise(&self) -> bool {
        self.in_sp.len() == 2 && self.group == self.c && self.group > 0
    }

    /// Runs a [`depthwise`](Self::depthwise) convolution into `out` (`n x m` planes):
    /// `emit(oc, acc, dst)` turns a run of one output channel's accumulators (bias included)
    /// into output values.
    pub(super) fn run_depthwise<T: Send>(
        &self,
        ctx: &KernelContext<'_>,
        op: &str,
        d: &Depthwise<'_>,
        out: &mut [T],
        emit: impl Fn(usize, &[i32], &mut [T]) + Sync,
    ) -> Result<(), PluginError> {
        let [ih, iw] = [self.in_sp[0], self.in_sp[1]];
        let [oh_n, ow_n] = [self.out_sp[0], self.out_sp[1]];
        let [kh_n, kw_n] = [self.k_sp[0], self.k_sp[1]];
        let taps = kh_n * kw_n;
        let plane = oh_n * ow_n;
        let mg = self.m / self.group;
        if plane == 0 || out.is_empty() {
            return Ok(());
        }
        let in_size = ih * iw;
        if d.x.len() < self.n * self.c * in_size || d.w.len() < self.m * taps {
            return Err(PluginError::invalid(format!(
                "{op}: x or w is shorter than its shape"
            )));
        }
        // Per kernel column, the output columns whose tap lies in the input (the same on
        // every row; integer divisions per row and tap were most of the time on small planes).
        let win = Window::of(self);
        let mut cols: Vec<(usize, usize)> = opreg_sdk::alloc::try_with_capacity(kw_n)?;
        cols.extend((0..kw_n).map(|kw| win.columns(kw)));
        let p = Pass {
            win,
            zx: d.x_zp,
            cols: &cols,
        };
        // Several small planes per task: one task per 7x7 plane costs more than the plane.
        let grain = plane * 4096usize.div_ceil(plane);
        ctx.parallel_chunks(out, grain, |start, chunk| {
            let mut acc = [0i32; BLOCK];
            for (k, planes) in chunk.chunks_mut(plane).enumerate() {
                let idx = start / plane + k;
                let (bn, oc) = (idx / self.m, idx % self.m);
                let ic = oc / mg.max(1);
                let x0 = (bn * self.c + ic) * in_size;
                let (Some(xp), Some(w)) = (
                    d.x.get(x0..x0 + in_size),
                    d.w.get(oc * taps..(oc + 1) * taps),
                ) else {
                    return;
                };
                let bias = d.bias.and_then(|b| b.get(oc)).copied().unwrap_or(0);
                for (oh, row) in planes.chunks_mut(ow_n).enumerate() {
                    for ow0 in (0..ow_n).step_by(BLOCK) {
                        let len = BLOCK.min(ow_n - ow0);
                        let acc = &mut acc[..len];
                        acc.fill(bias);
                        accumulate(&p, d.x_signed, xp, w, oh, ow0, acc);
                        emit(oc, acc, &mut row[ow0..ow0 + len]);
                    }
                }
            }
        })
    }
}

/// The geometry one plane's loop needs.
struct Pass<'a> {
    win: Window,
    zx: i32,
    /// Per kernel column, the range of output columns inside the input.
    cols: &'a [(usize, usize)],
}

impl Pass<'_> {
    #[inline(always)]
    fn body(&self, signed: bool, x: &[u8], w: &[i32], oh: usize, ow0: usize, acc: &mut [i32]) {
        if signed {
            self.taps::<true>(x, w, oh, ow0, acc)
        } else {
            self.taps::<false>(x, w, oh, ow0, acc)
        }
    }

    #[inline(always)]
    fn taps<const SIGNED: bool>(
        &self,
        x: &[u8],
        w: &[i32],
        oh: usize,
        ow0: usize,
        acc: &mut [i32],
    ) {
        let len = acc.len();
        let (zx, win) = (self.zx, &self.win);
        for kh in 0..win.kh_n {
            let Some(y) = win.row(oh, kh) else {
                continue;
            };
            let Some(line) = x.get(y * win.iw..(y + 1) * win.iw) else {
                return;
            };
            for kw in 0..win.kw_n {
                let wv = w.get(kh * win.kw_n + kw).copied().unwrap_or(0);
                if wv == 0 {
                    continue;
                }
                let off = kw * win.dw;
                let Some(&(lo, hi)) = self.cols.get(kw) else {
                    return;
                };
                let (lo, hi) = (lo.max(ow0), hi.min(ow0 + len));
                if lo >= hi {
                    continue;
                }
                let first = lo * win.sw + off - win.pw;
                let dst = &mut acc[lo - ow0..hi - ow0];
                let value = |b: u8| -> i32 {
                    if SIGNED {
                        i32::from(b as i8)
                    } else {
                        i32::from(b)
                    }
                };
                if win.sw == 1 {
                    let Some(src) = line.get(first..first + dst.len()) else {
                        return;
                    };
                    for (a, &b) in dst.iter_mut().zip(src) {
                        *a = a.wrapping_add(wv.wrapping_mul(value(b) - zx));
                    }
                } else {
                    // Strided: the taps' bytes gathered first (a plain copy), so that the
                    // multiply-add runs on contiguous values and vectorizes.
                    let mut gathered = [0u8; BLOCK];
                    let src = line.get(first..).unwrap_or_default().iter().step_by(win.sw);
                    for (g, &b) in gathered.iter_mut().zip(src) {
                        *g = b;
                    }
                    for (a, &b) in dst.iter_mut().zip(&gathered) {
                        *a = a.wrapping_add(wv.wrapping_mul(value(b) - zx));
                    }
                }
            }
        }
    }
}

crate::simd::simd_fn! {
    /// `acc[j] += Σ_taps w * (x - zx)` for output row `oh`, columns `ow0 ..`: taps in the
    /// padding contribute nothing (the padding holds the zero point).
    fn accumulate(
        p: &Pass<'_>,
        signed: bool,
        x: &[u8],
        w: &[i32],
        oh: usize,
        ow0: usize,
        acc: &mut [i32],
    ) {
        p.body(signed, x, w, oh, ow0, acc)
    }
}

/// Channels per register block of the channels-last loop: one AVX-512 register of i32 (two
/// AVX2 ones).
pub(super) const LANES: usize = 16;

/// A channels-last depthwise convolution's weights, prepared once (at load when they are
/// constant): tap-major, `w[tap * c + ch]`, their zero point subtracted, and per channel the
/// sum over the taps (the x zero point's share of a sum whose window lies inside x).
#[derive(Clone)]
pub(super) struct TapMajor {
    w: Vec<i32>,
    /// Taps in pairs, `[taps.div_ceil(2), c]`: tap `2i`'s weight in the low 16 bits and tap
    /// `2i + 1`'s in the high 16 bits of each channel's lane (0 past the last tap), for one
    /// `vpmaddwd` per two taps in the interior loop (zero-point-shifted weights of 8-bit
    /// tensors fit in i16).
    pairs: Vec<i32>,
    /// Whether every weight fits in i16, so that `pairs` holds them (shifted 8-bit weights
    /// always do: within ±255).
    pairs_fit: bool,
    /// The weights grouped four taps at a time for the VNNI loop, where the CPU has it and
    /// they fit in i8.
    quads: Option<Quads>,
    sums: Vec<i32>,
    c: usize,
    taps: usize,
}

impl TapMajor {
    /// From weights `[c, 1, kh, kw]` (`taps = kh * kw`) with their zero point subtracted.
    pub(super) fn new(shifted: &[i32], c: usize, taps: usize) -> Result<Self, PluginError> {
        let len = c
            .checked_mul(taps)
            .filter(|&l| l <= shifted.len())
            .ok_or_else(|| PluginError::invalid("QLinearConv: w is shorter than its shape"))?;
        let mut w = opreg_sdk::alloc::try_vec(len, 0i32)?;
        let mut sums = opreg_sdk::alloc::try_vec(c, 0i32)?;
        let mut pairs = opreg_sdk::alloc::try_vec(taps.div_ceil(2) * c, 0i32)?;
        if taps > 0 {
            for (ch, src) in shifted.chunks_exact(taps).take(c).enumerate() {
                for (t, &v) in src.iter().enumerate() {
                    w[t * c + ch] = v;
                    sums[ch] = sums[ch].wrapping_add(v);
                    // As i16 (a weight outside i16 leaves `pairs` unused: see `pairs_fit`).
                    let half = i32::from(v as i16 as u16);
                    pairs[t / 2 * c + ch] |= if t % 2 == 0 { half } else { half << 16 };
                }
            }
        }
        let pairs_fit = w.iter().all(|&v| i16::try_from(v).is_ok());
        let quads = quads::available()
            .then(|| Quads::new(shifted, c, taps))
            .flatten();
        Ok(TapMajor {
            w,
            pairs,
            pairs_fit,
            quads,
            sums,
            c,
            taps,
        })
    }

    /// Whether these are the weights of `c` channels of `taps` taps.
    pub(super) fn fits(&self, c: usize, taps: usize) -> bool {
        self.c == c && self.taps == taps
    }
}

/// QLinearConv's requantization of one position's sums, per output channel:
/// [`crate::simd::requant_byte`]`(sum + bias, mult, zp, lo, hi)`, in f32 as ONNX Runtime.
pub(super) struct Requant<'a> {
    pub bias: &'a [i32],
    pub mult: &'a [f32],
    /// The output's zero point.
    pub zp: i32,
    /// The output type's bounds less the zero point: where the rounded product is clamped.
    pub lo: f32,
    pub hi: f32,
}

impl Requant<'_> {
    /// `out[j] = requant_byte(sums[j] + bias[j], mult[j], ..)`.
    #[inline(always)]
    fn run(&self, sums: &[i32], bias: &[i32], mult: &[f32], out: &mut [u8]) {
        let (zp, lo, hi) = (self.zp, self.lo, self.hi);
        for (((o, &s), &b), &m) in out.iter_mut().zip(sums).zip(bias).zip(mult) {
            *o = crate::simd::requant_byte(s.wrapping_add(b), m, zp, lo, hi);
        }
    }
}

/// What the channels-last loop needs per output row.
struct Rows<'a> {
    win: Window,
    c: usize,
    zx: i32,
    w: &'a TapMajor,
    /// Per tap, its offset in x from the window's first position, `(kh * dh * iw + kw * dw) *
    /// c`.
    offsets: &'a [usize],
    /// Per channel, the bias less the x zero point's share of a sum whose window lies inside
    /// x: `bias - zx * Σ w`.
    inner: &'a [i32],
    /// The output columns whose window lies inside x's width.
    cols: (usize, usize),
    q: &'a Requant<'a>,
    /// The VNNI loop's operands, where it runs (the whole blocks of 64 channels).
    quads: Option<&'a QuadRows<'a>>,
}

#[inline(always)]
fn value<const SIGNED: bool>(b: u8) -> i32 {
    if SIGNED {
        i32::from(b as i8)
    } else {
        i32::from(b)
    }
}

impl Rows<'_> {
    /// Output row `oh` of one image `x` into `out` (`ow_n * c` bytes).
    #[inline(always)]
    fn row<const SIGNED: bool, const WIDE: bool>(&self, x: &[u8], oh: usize, out: &mut [u8]) {
        let (c, win) = (self.c, &self.win);
        let rows_inside = (0..win.kh_n).all(|kh| win.row(oh, kh).is_some());
        // With AVX-512, the windows inside x run as one pass over the row's interior for
        // every whole block of 16 channels; what is left is the channels past the last
        // whole block.
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if WIDE && rows_inside && self.w.pairs_fit && self.cols.0 < self.cols.1 {
            let mut from = 0;
            if let Some(q) = self.quads {
                // SAFETY: `quads` is set only where `quads::available()` (run_depthwise_nhwc).
                if !unsafe { quads::interior::<SIGNED>(self, q, x, oh, out) } {
                    return;
                }
                from = q.w.channels();
            }
            // SAFETY: WIDE rows run only from `wide::row`, on a CPU with AVX-512 F/BW/VL.
            if !unsafe { wide::interior_run::<SIGNED>(self, x, oh, from, out) } {
                return;
            }
            done = c - c % LANES;
        }
        for (ow, dst) in out.chunks_exact_mut(c).enumerate().take(win.ow_n) {
            if rows_inside && (self.cols.0..self.cols.1).contains(&ow) {
                // Every tap inside x (the first row and column of the window included).
                let base = ((oh * win.sh - win.ph) * win.iw + ow * win.sw - win.pw) * c;
                self.interior::<SIGNED>(x, base, done, dst);
            } else {
                let mut from = 0;
                #[cfg(target_arch = "x86_64")]
                if let (true, Some(q)) = (WIDE, self.quads) {
                    // SAFETY: `quads` is set only where `quads::available()`.
                    if !unsafe { quads::border::<SIGNED>(self, q, x, oh, ow, dst) } {
                        return;
                    }
                    from = q.w.channels();
                }
                self.border::<SIGNED, WIDE>(x, oh, ow, from, dst);
            }
        }
    }

    /// A position whose window lies inside x, starting at `base`, channels `from..`: each
    /// block of channels is summed over the taps, `Σ w * x` (the zero point's share is in
    /// `inner`), then requantized.
    #[inline(always)]
    fn interior<const SIGNED: bool>(&self, x: &[u8], base: usize, from: usize, dst: &mut [u8]) {
        let c = self.c;
        let mut c0 = from;
        while c0 < c {
            let n = LANES.min(c - c0);
            let mut acc = [0i32; LANES];
            if n == LANES {
                for (t, &off) in self.offsets.iter().enumerate() {
                    let at = base + off + c0;
                    let (Some(xs), Some(ws)) = (
                        x.get(at..).and_then(|s| s.first_chunk::<LANES>()),
                        self.w
                            .w
                            .get(t * c + c0..)
                            .and_then(|s| s.first_chunk::<LANES>()),
                    ) else {
                        return;
                    };
                    for ((a, &b), &w) in acc.iter_mut().zip(xs).zip(ws) {
                        *a = a.wrapping_add(w.wrapping_mul(value::<SIGNED>(b)));
                    }
                }
            } else {
                for (t, &off) in self.offsets.iter().enumerate() {
                    let at = base + off + c0;
                    let (Some(xs), Some(ws)) =
                        (x.get(at..at + n), self.w.w.get(t * c + c0..t * c + c0 + n))
                    else {
                        return;
                    };
                    for ((a, &b), &w) in acc.iter_mut().zip(xs).zip(ws) {
                        *a = a.wrapping_add(w.wrapping_mul(value::<SIGNED>(b)));
                    }
                }
            }
            let r = c0..c0 + n;
            self.q.run(
                &acc[..n],
                &self.inner[r.clone()],
                &self.q.mult[r.clone()],
                &mut dst[r],
            );
            c0 += n;
        }
    }

    /// A position whose window reaches into the padding, channels `from..`: `Σ w * (x -
    /// zx)` over the taps inside x.
    #[inline(always)]
    fn border<const SIGNED: bool, const WIDE: bool>(
        &self,
        x: &[u8],
        oh: usize,
        ow: usize,
        from: usize,
        dst: &mut [u8],
    ) {
        let (c, win) = (self.c, &self.win);
        let mut c0 = from;
        while c0 < c {
            let n = LANES.min(c - c0);
            #[cfg(target_arch = "x86_64")]
            if WIDE && n == LANES {
                // SAFETY: WIDE rows run only from `wide::row`, on a CPU with AVX-512 F/BW/VL.
                if !unsafe { wide::border::<SIGNED>(self, x, oh, ow, c0, dst) } {
                    return;
                }
                c0 += LANES;
                continue;
            }
            let mut acc = [0i32; LANES];
            for kh in 0..win.kh_n {
                let Some(y) = win.row(oh, kh) else {
                    continue;
                };
                for kw in 0..win.kw_n {
                    let xx = (ow * win.sw + kw * win.dw).wrapping_sub(win.pw);
                    if xx >= win.iw {
                        continue;
                    }
                    let (at, t) = ((y * win.iw + xx) * c + c0, (kh * win.kw_n + kw) * c + c0);
                    let (Some(xs), Some(ws)) = (x.get(at..at + n), self.w.w.get(t..t + n)) else {
                        return;
                    };
                    for ((a, &b), &w) in acc.iter_mut().zip(xs).zip(ws) {
                        *a = a.wrapping_add(w.wrapping_mul(value::<SIGNED>(b) - self.zx));
                    }
                }
            }
            let r = c0..c0 + n;
            self.q.run(
                &acc[..n],
                &self.q.bias[r.clone()],
                &self.q.mult[r.clone()],
                &mut dst[r],
            );
            c0 += n;
        }
    }
}

/// One output row of a channels-last depthwise convolution ([`Rows::row`]): with AVX-512,
/// blocks of 16 channels through [`wide`]'s intrinsics; otherwise the portable loops,
/// compiled for AVX2 and the baseline.
fn depthwise_row(p: &Rows<'_>, signed: bool, x: &[u8], oh: usize, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512() {
        // SAFETY: the CPU has AVX-512 F, BW and VL (checked).
        return unsafe { wide::row(p, signed, x, oh, out) };
    }
    portable_row(p, signed, x, oh, out)
}

crate::simd::simd_fn! {
    /// [`Rows::row`] without intrinsics (the loops vectorize as the target allows).
    fn portable_row(p: &Rows<'_>, signed: bool, x: &[u8], oh: usize, out: &mut [u8]) {
        if signed {
            p.row::<true, false>(x, oh, out)
        } else {
            p.row::<false, false>(x, oh, out)
        }
    }
}

/// The channels-last loop's blocks of 16 channels in AVX-512 registers. Written with
/// intrinsics because the compiler split the portable 16-lane loop into 8 + 4 + 4 scalar
/// lanes and kept the sums on the stack (measured: slower than the tap-major loop it was
/// meant to replace).
#[cfg(target_arch = "x86_64")]
pub(super) mod wide {
    use super::{Requant, Rows, LANES};
    use std::arch::x86_64::*;

    /// [`Rows::row`] with its 16-channel blocks in registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn row(p: &Rows<'_>, signed: bool, x: &[u8], oh: usize, out: &mut [u8]) {
        if signed {
            p.row::<true, true>(x, oh, out)
        } else {
            p.row::<false, true>(x, oh, out)
        }
    }

    /// 16 bytes of x widened to i32, sign-extended for i8.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    fn widen<const SIGNED: bool>(v: __m128i) -> __m512i {
        if SIGNED {
            _mm512_cvtepi8_epi32(v)
        } else {
            _mm512_cvtepu8_epi32(v)
        }
    }

    /// 16 i32 from `v`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    fn load(v: &[i32; LANES]) -> __m512i {
        // SAFETY: `v` holds the 16 values read.
        unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
    }

    /// Positions per pass of the interior loop: each tap's weights are loaded once for this
    /// many positions (4 x 16 sums in registers).
    const POSITIONS: usize = 4;

    /// Output row `oh`'s windows inside x (columns `cols`), every whole block of 16
    /// channels from channel `from`: `Σ w * x` over the taps, requantized with `inner`'s
    /// biases, into `out` (the row). One bounds check for the row; `false` where x, the weights or the row are
    /// shorter than the geometry says (the caller checked: never).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn interior_run<const SIGNED: bool>(
        p: &Rows<'_>,
        x: &[u8],
        oh: usize,
        from: usize,
        out: &mut [u8],
    ) -> bool {
        let (c, win) = (p.c, &p.win);
        let (ow0, ow1) = p.cols;
        if ow0 >= ow1 || c < LANES {
            return true;
        }
        let step = win.sw * c;
        let max_off = p.offsets.iter().copied().max().unwrap_or(0);
        // The first window's start, and one past the last byte any window of the row reads.
        let base0 = ((oh * win.sh - win.ph) * win.iw + ow0 * win.sw - win.pw) * c;
        let end = (ow1 - 1 - ow0)
            .checked_mul(step)
            .and_then(|v| v.checked_add(base0)?.checked_add(max_off)?.checked_add(c));
        if end.is_none_or(|e| e > x.len())
            || p.w.w.len() < p.offsets.len() * c
            || out.len() < ow1 * c
            || p.inner.len() < c
            || p.q.mult.len() < c
        {
            return false;
        }
        if p.w.pairs.len() < p.offsets.len().div_ceil(2) * c {
            return false;
        }
        let (xp, wp) = (x.as_ptr(), p.w.pairs.as_ptr());
        // SAFETY (every load below): a window `ow` in `ow0..ow1` reads x from
        // `base0 + (ow - ow0) * step + off + c0` for 16 bytes, with `off <= max_off` and
        // `c0 + 16 <= c`, so below `end <= x.len()`; tap pair `tp < offsets.len().div_ceil(2)`
        // reads 16 lanes from `tp * c + c0`, below `offsets.len().div_ceil(2) * c <=
        // pairs.len()`.
        let tap = |base: usize, off: usize| unsafe { _mm_loadu_si128(xp.add(base + off).cast()) };
        // Two taps' x as i16 pairs per channel (tap `o0` low, `o1` high), for `vpmaddwd`
        // against `pairs`: one multiply-add where `vpmullo` took two multiplies (each two
        // uops on port 0) and two adds. Without a second tap the high half is whatever the
        // widening left, against a zero weight.
        let pair = |base: usize, o0: usize, o1: Option<usize>| {
            let lo = widen::<SIGNED>(tap(base, o0));
            match o1 {
                Some(o1) => {
                    let hi = _mm512_slli_epi32::<16>(widen::<SIGNED>(tap(base, o1)));
                    _mm512_mask_blend_epi16(0xAAAA_AAAA, lo, hi)
                }
                None => lo,
            }
        };
        for c0 in (from..c - c % LANES).step_by(LANES) {
            let mut ow = ow0;
            while ow < ow1 {
                let n = POSITIONS.min(ow1 - ow);
                let base = base0 + (ow - ow0) * step + c0;
                let mut acc = [_mm512_setzero_si512(); POSITIONS];
                for (tp, taps) in p.offsets.chunks(2).enumerate() {
                    let (o0, o1) = (taps[0], taps.get(1).copied());
                    let wv = unsafe { _mm512_loadu_si512(wp.add(tp * c + c0).cast()) };
                    if n == POSITIONS {
                        for (j, a) in acc.iter_mut().enumerate() {
                            let xv = pair(base + j * step, o0, o1);
                            *a = _mm512_add_epi32(*a, _mm512_madd_epi16(wv, xv));
                        }
                    } else {
                        for (j, a) in acc.iter_mut().enumerate().take(n) {
                            let xv = pair(base + j * step, o0, o1);
                            *a = _mm512_add_epi32(*a, _mm512_madd_epi16(wv, xv));
                        }
                    }
                }
                for (j, &a) in acc.iter().enumerate().take(n) {
                    let at = (ow + j) * c;
                    requantize(p, a, p.inner, c0, &mut out[at..at + c]);
                }
                ow += n;
            }
        }
        true
    }

    /// A window reaching into the padding at output `(oh, ow)`, channels `c0..c0 + 16`:
    /// `Σ w * (x - zx)` over the taps inside x, then requantized with the node's biases.
    /// The tap walk is written out as in the scalar border: one iterator over the taps
    /// shared by both (filter_map + flat_map) made MobileNetV2-QDQ ~15 % slower (measured).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    pub(super) fn border<const SIGNED: bool>(
        p: &Rows<'_>,
        x: &[u8],
        oh: usize,
        ow: usize,
        c0: usize,
        dst: &mut [u8],
    ) -> bool {
        let (c, win) = (p.c, &p.win);
        let zx = _mm512_set1_epi32(p.zx);
        let mut acc = _mm512_setzero_si512();
        for kh in 0..win.kh_n {
            let Some(y) = win.row(oh, kh) else {
                continue;
            };
            for kw in 0..win.kw_n {
                let xx = (ow * win.sw + kw * win.dw).wrapping_sub(win.pw);
                if xx >= win.iw {
                    continue;
                }
                let (at, t) = ((y * win.iw + xx) * c + c0, (kh * win.kw_n + kw) * c + c0);
                let (Some(xs), Some(ws)) = (
                    x.get(at..).and_then(|s| s.first_chunk::<LANES>()),
                    p.w.w.get(t..).and_then(|s| s.first_chunk::<LANES>()),
                ) else {
                    return false;
                };
                // SAFETY: `xs` holds the 16 bytes read.
                let xs = unsafe { _mm_loadu_si128(xs.as_ptr().cast()) };
                let xv = _mm512_sub_epi32(widen::<SIGNED>(xs), zx);
                acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(load(ws), xv));
            }
        }
        requantize(p, acc, p.q.bias, c0, dst)
    }

    /// `dst[j] = round_clamp((acc[j] + bias[c0 + j]) * mult[c0 + j] + zp)` for 16 channels
    /// (see [`requantize16`]). `false` where a slice is short.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    fn requantize(p: &Rows<'_>, acc: __m512i, bias: &[i32], c0: usize, dst: &mut [u8]) -> bool {
        let (Some(b), Some(m), Some(out)) = (
            bias.get(c0..).and_then(|s| s.first_chunk::<LANES>()),
            p.q.mult.get(c0..).and_then(|s| s.first_chunk::<LANES>()),
            dst.get_mut(c0..).and_then(|s| s.first_chunk_mut::<LANES>()),
        ) else {
            return false;
        };
        let v = requantize16(p.q, acc, b, m);
        // SAFETY: `out` holds the 16 bytes written.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), v) };
        true
    }

    /// 16 sums requantized to bytes as [`Requant::run`] computes them:
    /// `requant_byte(acc[j] + bias[j], mult[j], ..)` (the sum converted to f32, one
    /// product, clamped with NaN to `lo`, the zero point added and rounded half to even).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    pub(in crate::quant::conv) fn requantize16(
        q: &Requant<'_>,
        acc: __m512i,
        bias: &[i32; LANES],
        mult: &[f32; LANES],
    ) -> __m128i {
        // 1.5 * 2^23 plus the zero point, as `requant_byte`.
        let magic = _mm512_set1_ps(12_582_912.0 + q.zp as f32);
        let v = _mm512_add_epi32(acc, load(bias));
        // SAFETY: `mult` holds the 16 multipliers read.
        let m = unsafe { _mm512_loadu_ps(mult.as_ptr()) };
        let f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), m);
        // `max` returns its second operand when the first is NaN: NaN -> lo, as the scalar.
        let f = _mm512_max_ps(f, _mm512_set1_ps(q.lo));
        let f = _mm512_min_ps(f, _mm512_set1_ps(q.hi));
        _mm512_cvtepi32_epi8(_mm512_castps_si512(_mm512_add_ps(f, magic)))
    }
}

impl Geometry {
    /// Runs a [`depthwise`](Self::depthwise) QLinearConv with one output channel per input
    /// channel over channels-last x and out (`[n, h, w, c]`), requantizing as it goes. Per
    /// output position and block of 16 channels (contiguous in x, in the tap-major weights
    /// and in the output), the sums stay in a register across the taps and are requantized
    /// at once: nothing but x, the weights and the output bytes touches memory. A window
    /// inside x sums `w * x` and corrects for the zero point once per channel (`inner`);
    /// one reaching into the padding skips the taps outside.
    /// For a padded depthwise convolution over a small plane (MobileNet's 14x14 and 7x7
    /// layers, where a quarter to a half of the positions reach into the padding and took
    /// the per-tap border loop at about twice the interior's cost per position), x copied
    /// into a frame of zero-point bytes as wide as the windows reach, and the geometry over
    /// it without padding: every position is then interior, the same sums (a padded tap adds
    /// `w * (zx - zx)`). `None` where there is no padding or the plane is larger (the border
    /// is a small share there, and the copy would cost more than it saves), and for strided
    /// layers: a stride-2 window reaches into the padding on one side of each axis only (a
    /// seventh of MobileNetV2's 14x14 outputs), while the copy moves four times the output's
    /// positions; copied, its 28 -> 14 and 14 -> 7 layers took 10.5-11.5 us at batch 1 (ONNX
    /// Runtime 8-9), 9.4-9.8 without, and 100-140 us against 45-50 at batch 8.
    fn padded_nhwc<'c>(
        &self,
        ctx: &'c KernelContext<'_>,
        x: &[u8],
        zx: i32,
        row: usize,
        rows: usize,
    ) -> Result<Option<(&'c [u8], Geometry)>, PluginError> {
        const MAX_PLANE: usize = 14 * 14;
        let win = Window::of(self);
        let (oh_n, ow_n) = (self.out_sp[0], win.ow_n);
        if row == 0
            || rows == 0
            || oh_n * ow_n > MAX_PLANE
            || win.kh_n == 0
            || win.kw_n == 0
            || (win.sh, win.sw) != (1, 1)
        {
            return Ok(None);
        }
        // The frame's extent: from the first window's first tap to the last one's last.
        let extent = |o: usize, s: usize, k: usize, d: usize| -> Option<usize> {
            (o - 1)
                .checked_mul(s)?
                .checked_add((k - 1).checked_mul(d)?)?
                .checked_add(1)
        };
        let (Some(fh), Some(fw)) = (
            extent(oh_n, win.sh, win.kh_n, win.dh),
            extent(ow_n, win.sw, win.kw_n, win.dw),
        ) else {
            return Ok(None);
        };
        if win.ph == 0 && win.pw == 0 && fh <= win.ih && fw <= win.iw {
            // Every window inside x already.
            return Ok(None);
        }
        let c = self.c;
        let frame = numel(&[fh, fw, c])?;
        let image = win.ih * win.iw * c;
        // A frame far larger than x (dilated windows over a few pixels) is mostly padding:
        // the border loop skips it instead of copying it.
        if frame > 4 * image.max(c * 16) || x.len() < self.n * image {
            return Ok(None);
        }
        // Reused scratch, every byte written below, row by row in parallel. Built serially in
        // a fresh vector filled with the zero point, then the copy over it, the frame took
        // 8-11 us of a 14x14 layer's 24-30 at 2 threads, on one core while the other waited:
        // MobileNetV2's 14x14 int8 layers ran hardly faster on two threads than on one (and
        // the whole model 1.09x ONNX Runtime at 2 threads against 0.94x at one; now 1.06x).
        let padded = ctx.scratch_reused::<u8>(numel(&[self.n, frame])?)?;
        // Frame column `fx` holds x's column `fx - pw`: the run of those inside x.
        let (x0, x1) = (win.pw.min(fw), (win.pw + win.iw).min(fw));
        let frow = fw * c;
        let z = zx as u8;
        ctx.parallel_chunks(padded, frow, |start, drow| {
            let r = start / frow;
            let (bn, fy) = (r / fh, r % fh);
            let y = fy.wrapping_sub(win.ph);
            if y >= win.ih || x0 >= x1 {
                drow.fill(z);
                return;
            }
            let from = bn * image + y * win.iw * c;
            drow[..x0 * c].fill(z);
            drow[x0 * c..x1 * c].copy_from_slice(&x[from..from + (x1 - x0) * c]);
            drow[x1 * c..].fill(z);
        })?;
        let geo = Geometry {
            in_sp: vec![fh, fw],
            pad_begin: vec![0, 0],
            ..self.clone()
        };
        Ok(Some((padded, geo)))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_depthwise_nhwc(
        &self,
        ctx: &KernelContext<'_>,
        op: &str,
        x: &[u8],
        x_signed: bool,
        zx: i32,
        w: &TapMajor,
        q: &Requant<'_>,
        out: &mut [u8],
    ) -> Result<(), PluginError> {
        let c = self.c;
        let win = Window::of(self);
        let (ih, iw, oh_n, ow_n) = (win.ih, win.iw, self.out_sp[0], win.ow_n);
        let taps = win.kh_n * win.kw_n;
        let row = ow_n * c;
        let rows = self.n * oh_n;
        if row == 0 || rows == 0 {
            return Ok(());
        }
        let image = ih * iw * c;
        if self.m != c
            || !w.fits(c, taps)
            || q.bias.len() < c
            || q.mult.len() < c
            || x.len() < self.n * image
            || out.len() < rows * row
        {
            return Err(PluginError::invalid(format!(
                "{op}: x, w, B or y does not fit the convolution's shape"
            )));
        }
        if let Some((padded, geo)) = self.padded_nhwc(ctx, x, zx, row, rows)? {
            return geo.run_depthwise_nhwc(ctx, op, padded, x_signed, zx, w, q, out);
        }
        let mut inner = opreg_sdk::alloc::try_vec(c, 0i32)?;
        for ((v, &b), &s) in inner.iter_mut().zip(q.bias).zip(&w.sums) {
            *v = b.wrapping_sub(zx.wrapping_mul(s));
        }
        // Per tap, its offset from the window's first position; a window too large for
        // these to fit in memory has no position inside x.
        let mut offsets: Vec<usize> = opreg_sdk::alloc::try_with_capacity(taps)?;
        let mut cols = if taps == 0 { (0, 0) } else { (0, ow_n) };
        for kh in 0..win.kh_n {
            for kw in 0..win.kw_n {
                let off = kh
                    .checked_mul(win.dh)
                    .and_then(|v| v.checked_mul(iw))
                    .and_then(|v| v.checked_add(kw.checked_mul(win.dw)?))
                    .and_then(|v| v.checked_mul(c));
                match off {
                    Some(off) => offsets.push(off),
                    None => cols = (0, 0),
                }
            }
        }
        for kw in 0..win.kw_n {
            let (lo, hi) = win.columns(kw);
            cols = (cols.0.max(lo), cols.1.min(hi));
        }
        let quad_rows = match &w.quads {
            Some(qw) => {
                // The loop reads i8 x as `x + 128`: its zero point moves with it.
                let zq = zx.wrapping_add(if x_signed { 128 } else { 0 });
                let mut shifted = opreg_sdk::alloc::try_vec(c, 0i32)?;
                for ((v, &b), &s) in shifted.iter_mut().zip(q.bias).zip(&w.sums) {
                    *v = b.wrapping_sub(zq.wrapping_mul(s));
                }
                Some(QuadRows {
                    w: qw,
                    groups: qw.groups(&offsets)?,
                    pad: opreg_sdk::alloc::try_vec(qw.channels(), zx as u8)?,
                    inner: qw.permute(&shifted)?,
                    mult: qw.permute(q.mult)?,
                })
            }
            _ => None,
        };
        let p = Rows {
            win,
            c,
            zx,
            w,
            offsets: &offsets,
            inner: &inner,
            cols,
            q,
            quads: quad_rows.as_ref(),
        };
        // Several output rows per task when rows are small (MobileNet's 7x7 layers).
        let grain = row * 8192usize.div_ceil(row);
        ctx.parallel_chunks(&mut out[..rows * row], grain, |start, chunk| {
            for (k, orow) in chunk.chunks_mut(row).enumerate() {
                let r = start / row + k;
                let (bn, oh) = (r / oh_n, r % oh_n);
                let Some(xi) = x.get(bn * image..(bn + 1) * image) else {
                    return;
                };
                depthwise_row(&p, x_signed, xi, oh, orow);
            }
        })
    }
}
