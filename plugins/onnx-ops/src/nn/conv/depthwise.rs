//! Depthwise 2-D convolution in f32 (one input channel per output channel), computed directly
//! on the NCHW planes.
//!
//! The general path unrolls each group with im2col and calls a gemm of one output row per
//! group: for a depthwise layer that is `kh*kw` copies of the plane and a matrix product with
//! nothing to reuse, per channel (MobileNetV2's 17 depthwise layers spent most of its f32 run
//! there). Here each output row is built in place from the input rows under it: the bias,
//! then each kernel row's taps over the range of outputs where all of them fall inside the
//! input (one pass per kernel row for 3-wide kernels, one per tap otherwise; the loops are
//! over contiguous outputs, so they vectorize), the edges with checks, then the activation.

use super::Activation;
use crate::nn::{Disjoint, Geometry};
use opreg_sdk::{alloc::try_vec, prelude::*};

/// Whether the convolution of `x` (shape `xs`) with `group` groups and `m` output channels is
/// one this module computes: 2-D, one input and one output channel per group.
pub(super) fn applies(xs: &[usize], group: usize, m: usize) -> bool {
    xs.len() == 4 && group > 1 && xs[1] == group && m == group
}

/// The depthwise convolution into `y` (`n x c x oh x ow`), with `bias` and `act` applied.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    ctx: &KernelContext<'_>,
    xs: &[usize],
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
) -> Result<(), PluginError> {
    let (c, ih, iw) = (xs[1], xs[2], xs[3]);
    let (oh, ow) = (g.out[0], g.out[1]);
    let (kh, kw) = (g.kernel[0], g.kernel[1]);
    let plane_in = ih * iw;
    let plane_out = oh * ow;
    let taps = kh * kw;
    if plane_out == 0 || y.is_empty() {
        return Ok(());
    }
    let y_planes = y.len() / plane_out;
    // About 64k multiply-adds per task: enough to pay for the dispatch, small enough to
    // spread the 32-channel layers over the threads.
    let planes = (65536 / plane_out.saturating_mul(taps).max(1)).clamp(1, c.max(1));
    // Stride-2 rows are split into their even and odd elements first, so the taps read
    // contiguous runs: `ow + 1` of each per input row.
    let split = g.strides[1] == 2 && g.dilations[1] == 1 && g.kernel[1] == 3;
    let split_len = if split { 2 * (ow + 1) } else { 0 };
    let yd = Disjoint::new(y);
    ctx.parallel_for(y_planes, planes, |range| {
        let mut halves = try_vec(split_len, 0.0f32)?;
        for plane in range {
            // SAFETY: each plane is written by the one task whose range holds it.
            let out = unsafe { yd.part(plane * plane_out, plane_out) };
            let ch = plane % c;
            let xp = &x[plane * plane_in..(plane + 1) * plane_in];
            let wk = &w[ch * taps..(ch + 1) * taps];
            let b = bias.map_or(0.0, |b| b[ch]);
            channel(xp, (ih, iw), wk, g, b, act, out, ow, &mut halves);
        }
        Ok(())
    })
}

crate::simd::simd_fn! {
    /// One channel: `out` (`oh x ow`) from the plane `xp` (`ih x iw`) (compiled for AVX-512 and
    /// AVX2 too: the baseline vectorizes these loops 4 wide).
    #[allow(clippy::too_many_arguments)]
    fn channel(
        xp: &[f32],
        dims: (usize, usize),
        wk: &[f32],
        g: &Geometry,
        b: f32,
        act: Activation,
        out: &mut [f32],
        ow: usize,
        halves: &mut [f32],
    ) {
        let (ih, iw) = dims;
        let (kh, kw) = (g.kernel[0], g.kernel[1]);
        let (sh, sw) = (g.strides[0], g.strides[1]);
        let (dh, dw) = (g.dilations[0], g.dilations[1]);
        let (ph, pw) = (g.pad_begin[0], g.pad_begin[1]);
        // Outputs whose every tap lies inside a row: ox*sw - pw >= 0 and
        // ox*sw + (kw-1)*dw - pw < iw.
        let lo = pw.div_ceil(sw).min(ow);
        let span = (kw - 1) * dw;
        let hi = if iw + pw > span {
            ((iw + pw - span - 1) / sw + 1).clamp(lo, ow)
        } else {
            lo
        };
        for (oy, row) in out.chunks_mut(ow).enumerate() {
            row.fill(b);
            for ky in 0..kh {
                let iy = (oy * sh + ky * dh) as isize - ph as isize;
                if iy < 0 || iy >= ih as isize {
                    continue;
                }
                let xr = &xp[iy as usize * iw..(iy as usize + 1) * iw];
                let wr = &wk[ky * kw..(ky + 1) * kw];
                // The edges: each tap checked.
                for ox in (0..lo).chain(hi..ow) {
                    let mut s = 0.0;
                    for (kx, &wv) in wr.iter().enumerate() {
                        let ix = (ox * sw + kx * dw) as isize - pw as isize;
                        if ix >= 0 && ix < iw as isize {
                            s += wv * xr[ix as usize];
                        }
                    }
                    row[ox] += s;
                }
                if lo >= hi {
                    continue;
                }
                // The interior: every tap inside the row.
                let base = lo * sw - pw;
                let inner = &mut row[lo..hi];
                match (kw, sw) {
                    (3, 1) => {
                        let (w0, w1, w2) = (wr[0], wr[1], wr[2]);
                        let n = inner.len();
                        let (x0, x1, x2) = (
                            &xr[base..base + n],
                            &xr[base + dw..base + dw + n],
                            &xr[base + 2 * dw..base + 2 * dw + n],
                        );
                        for (((o, &a), &bb), &cc) in inner.iter_mut().zip(x0).zip(x1).zip(x2) {
                            *o += w0 * a + w1 * bb + w2 * cc;
                        }
                    }
                    (3, 2) if dw == 1 && halves.len() >= 2 * (inner.len() + 1) => {
                        let (w0, w1, w2) = (wr[0], wr[1], wr[2]);
                        let n = inner.len();
                        let (even, odd) = halves.split_at_mut(n + 1);
                        // Taps at base + 2j, base + 2j + 1, base + 2j + 2 (the last within the row).
                        // Pairs from `base` (plain loads and stores, so it vectorizes);
                        // the last even tap may have no odd partner in the row.
                        let src = &xr[base..];
                        let pairs = even.iter_mut().zip(odd.iter_mut());
                        for ((e, o), p) in pairs.zip(src.chunks_exact(2)) {
                            *e = p[0];
                            *o = p[1];
                        }
                        even[n] = src[2 * n];
                        let (e0, e1, o0) = (&even[..n], &even[1..=n], &odd[..n]);
                        for (((out, &a), &bb), &cc) in inner.iter_mut().zip(e0).zip(o0).zip(e1) {
                            *out += w0 * a + w1 * bb + w2 * cc;
                        }
                    }
                    (3, _) => {
                        let (w0, w1, w2) = (wr[0], wr[1], wr[2]);
                        for (j, o) in inner.iter_mut().enumerate() {
                            let at = base + j * sw;
                            *o += w0 * xr[at] + w1 * xr[at + dw] + w2 * xr[at + 2 * dw];
                        }
                    }
                    _ => {
                        for (kx, &wv) in wr.iter().enumerate() {
                            let off = base + kx * dw;
                            for (j, o) in inner.iter_mut().enumerate() {
                                *o += wv * xr[off + j * sw];
                            }
                        }
                    }
                }
            }
            if act != Activation::None {
                row.iter_mut().for_each(|v| *v = act.apply(*v));
            }
        }
    }
}
