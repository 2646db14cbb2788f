//! Depthwise 2-D integer convolution (one input channel per group: MobileNet's 3x3 layers):
//! a direct loop per output plane. Through im2col and the gemm, each of the hundreds of groups
//! is a product one column wide, and the quantized MobileNetV2 ran 4.7 times slower than the
//! float one (measured); here each plane is a few passes of `acc += w * (x - zx)` along
//! output rows, which vectorize for unit strides.

use super::Geometry;
use opreg_sdk::prelude::*;

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

/// Channels accumulated at a time by the channels-last loop: a row's sums are `ow * CHANNELS`
/// i32 at most (MobileNet's 112-wide rows of 32 channels: 14 KiB, within L1).
const CHANNELS: usize = 256;

/// The geometry the channels-last loop needs per output row.
struct Position<'a> {
    win: Window,
    c: usize,
    zx: i32,
    /// Weights tap-major: `w[tap * c + channel]`, zero point subtracted.
    w: &'a [i32],
}

impl Geometry {
    /// Runs a [`depthwise`](Self::depthwise) convolution with one output channel per input
    /// channel over channels-last x and out (`[n, h, w, c]`), a whole output row at a time:
    /// per tap, the row's positions inside the input are multiply-added along the channels,
    /// which are contiguous in x, in the tap-major weights and in the sums (one call per row
    /// and channel block; a tap's weights stay in registers across the row). `emit(c0, acc,
    /// dst)` turns one position's sums of channels `c0..` (bias not included) into output
    /// values.
    pub(super) fn run_depthwise_nhwc(
        &self,
        ctx: &KernelContext<'_>,
        op: &str,
        d: &Depthwise<'_>,
        out: &mut [u8],
        emit: impl Fn(usize, &[i32], &mut [u8]) + Sync,
    ) -> Result<(), PluginError> {
        let c = self.c;
        let [ih, iw] = [self.in_sp[0], self.in_sp[1]];
        let [oh_n, ow_n] = [self.out_sp[0], self.out_sp[1]];
        let [kh_n, kw_n] = [self.k_sp[0], self.k_sp[1]];
        let taps = kh_n * kw_n;
        let row = ow_n * c;
        if out.is_empty() || row == 0 {
            return Ok(());
        }
        if self.m != c
            || d.x.len() < self.n * ih * iw * c
            || d.w.len() < c * taps
            || out.len() < self.n * oh_n * row
        {
            return Err(PluginError::invalid(format!(
                "{op}: x, w or y is shorter than its shape"
            )));
        }
        let mut w = opreg_sdk::alloc::try_vec(taps * c, 0i32)?;
        for (ch, src) in d.w.chunks_exact(taps).take(c).enumerate() {
            for (t, &v) in src.iter().enumerate() {
                w[t * c + ch] = v;
            }
        }
        let p = Position {
            win: Window::of(self),
            c,
            zx: d.x_zp,
            w: &w,
        };
        let image = ih * iw * c;
        let cn_max = CHANNELS.min(c);
        // Several output rows per task when rows are small (MobileNet's 7x7 layers).
        let grain = row * 8192usize.div_ceil(row);
        let failed = std::sync::atomic::AtomicBool::new(false);
        ctx.parallel_chunks(out, grain, |start, chunk| {
            // The row's sums: ow_n * cn_max i32, allocated once per task (fallibly: the
            // width comes from the model).
            let Ok(mut acc) = opreg_sdk::alloc::try_vec(ow_n * cn_max, 0i32) else {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                return;
            };
            for (k, orow) in chunk.chunks_mut(row).enumerate() {
                let r = start / row + k;
                let (bn, oh) = (r / oh_n, r % oh_n);
                let Some(x) = d.x.get(bn * image..(bn + 1) * image) else {
                    return;
                };
                for c0 in (0..c).step_by(CHANNELS) {
                    let cn = CHANNELS.min(c - c0);
                    let acc = &mut acc[..ow_n * cn];
                    accumulate_row(&p, d.x_signed, x, oh, c0, acc);
                    for (pixel, sums) in orow.chunks_exact_mut(c).zip(acc.chunks_exact(cn)) {
                        emit(c0, sums, &mut pixel[c0..c0 + cn]);
                    }
                }
            }
        })?;
        if failed.into_inner() {
            return Err(PluginError::invalid(format!(
                "{op}: out of memory for a row of {ow_n} x {cn_max} sums"
            )));
        }
        Ok(())
    }
}

impl Position<'_> {
    #[inline(always)]
    fn row<const SIGNED: bool>(&self, x: &[u8], oh: usize, c0: usize, acc: &mut [i32]) {
        let (c, zx, win) = (self.c, self.zx, &self.win);
        let cn = acc.len() / win.ow_n.max(1);
        acc.fill(0);
        for kh in 0..win.kh_n {
            let Some(y) = win.row(oh, kh) else {
                continue;
            };
            let Some(xrow) = x.get(y * win.iw * c..(y + 1) * win.iw * c) else {
                return;
            };
            for kw in 0..win.kw_n {
                let t = (kh * win.kw_n + kw) * c + c0;
                let Some(ws) = self.w.get(t..t + cn) else {
                    return;
                };
                let (lo, hi) = win.columns(kw);
                for ow in lo..hi {
                    let at = (ow * win.sw + kw * win.dw - win.pw) * c + c0;
                    let (Some(xs), Some(a)) =
                        (xrow.get(at..at + cn), acc.get_mut(ow * cn..ow * cn + cn))
                    else {
                        return;
                    };
                    for ((a, &b), &wv) in a.iter_mut().zip(xs).zip(ws) {
                        let v = if SIGNED {
                            i32::from(b as i8)
                        } else {
                            i32::from(b)
                        };
                        *a = a.wrapping_add(wv.wrapping_mul(v - zx));
                    }
                }
            }
        }
    }
}

crate::simd::simd_fn! {
    /// `acc[ow * cn + j] = Σ_taps w[tap][c0 + j] * (x[.., c0 + j] - zx)` for every column
    /// `ow` of output row `oh` of one channels-last image (`cn = acc.len() / ow_n`): taps in
    /// the padding contribute nothing.
    fn accumulate_row(
        p: &Position<'_>,
        signed: bool,
        x: &[u8],
        oh: usize,
        c0: usize,
        acc: &mut [i32],
    ) {
        if signed {
            p.row::<true>(x, oh, c0, acc)
        } else {
            p.row::<false>(x, oh, c0, acc)
        }
    }
}
