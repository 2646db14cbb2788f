//! 2-D convolutions with few input channels (an image network's first layer: 3 channels,
//! 3x3 or 7x7), computed directly with AVX-512.
//!
//! Through im2col and the gemm such a layer is bound by memory, not arithmetic: each output
//! pixel gets a column of `c * kh * kw` values (27 for MobileNetV2's first layer) that is
//! written, packed again by the BLAS, multiplied in one shallow block, and the product is
//! read and written once more to add the bias and the activation. MobileNetV2's first layer
//! took 0.65 ms at 2 threads that way, four times ONNX Runtime's (which convolves it
//! directly, `MlasConvNchwFloatKernel`). Here each image is copied once into the zero-padded,
//! phase-split form of [`Padded`] (every tap of a run of outputs then reads one contiguous
//! run of the copy, whatever the padding, stride and dilation), and the output is computed
//! row by row, [`OC`] output channels x [`PIX`] pixels at a time, the sums in registers:
//! per tap one load and [`OC`] multiply-adds with broadcast weights. The bias, a fused sum and
//! the activation are applied to each output row while it is in cache.

use super::depthwise::Padded;
use super::{finish_plane, Activation};
use crate::nn::{Disjoint, Geometry};
use opreg_sdk::{
    alloc::{checked_numel, try_vec, try_with_capacity},
    prelude::*,
};

/// Output pixels per register (f32 lanes of an AVX-512 register).
const PIX: usize = 16;
/// Output channels computed together (one register of sums each).
const OC: usize = 8;
/// At most this many input channels: with more, each output pixel's column is deep enough
/// for the gemm to run near its peak.
const MAX_CHANNELS: usize = 4;

/// Whether this module computes the convolution of `x` (shape `xs`) with a `kernel` window
/// and `group` groups: 2-D, one group, at most [`MAX_CHANNELS`] input channels, on a CPU with
/// AVX-512.
pub(super) fn applies(xs: &[usize], kernel: &[usize], group: usize) -> bool {
    xs.len() == 4
        && kernel.len() == 2
        && group == 1
        && (1..=MAX_CHANNELS).contains(&xs[1])
        && kernel.iter().all(|&k| k > 0)
        && avx512()
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::simd::has_avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The convolution into `y` (`n x m x oh x ow`), then `act((y + bias) + z)` per element as
/// the general path's `finish` does. `Ok(false)` (nothing written) where the padded copy
/// would be much larger than x (huge pads or dilations): the general path handles those.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    ctx: &KernelContext<'_>,
    xs: &[usize],
    g: &Geometry,
    m: usize,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    z: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
) -> Result<bool, PluginError> {
    let (n, c, ih, iw) = (xs[0], xs[1], xs[2], xs[3]);
    let (oh, ow) = (g.out[0], g.out[1]);
    // Non-empty y: its extents multiply without overflow.
    let plane = oh * ow;
    if y.is_empty() || plane == 0 || m == 0 {
        return Ok(true);
    }
    // A geometry whose padded copy would overflow or be much larger than x (huge pads or
    // dilations) is left to the general path, which sizes nothing by the padding.
    let Ok(pad) = Padded::new(g, (oh, ow), PIX) else {
        return Ok(false);
    };
    let image = checked_numel(&[c, ih, iw])?;
    let copy_len = checked_numel(&[c, pad.len])?;
    if copy_len > 2 * image + (1 << 16) {
        return Ok(false);
    }
    let depth = checked_numel(&[c, pad.kh, pad.kw])?;
    if x.len() < checked_numel(&[n, image])?
        || w.len() < checked_numel(&[m, depth])?
        || y.len() < n * m * plane
        || bias.is_some_and(|b| b.len() < m)
        || z.is_some_and(|z| z.len() < y.len())
    {
        return Err(PluginError::invalid(
            "Conv: X, W, B or Z is shorter than its shape",
        ));
    }
    // Per tap (channel, ky, kx) in W's order, its offset in the copy from a run's start.
    let mut offsets = try_vec(depth, 0usize)?;
    for ci in 0..c {
        for ky in 0..pad.kh {
            for kx in 0..pad.kw {
                offsets[(ci * pad.kh + ky) * pad.kw + kx] = ci * pad.len + pad.offset(ky, kx);
            }
        }
    }
    // W regrouped per block of OC output channels, tap-major: `wt[(blk * depth + t) * OC +
    // o]`, zero for the channels past m.
    let blocks = m.div_ceil(OC);
    let mut wt = try_vec(checked_numel(&[blocks, depth, OC])?, 0.0f32)?;
    for (oc, wo) in w.chunks_exact(depth).take(m).enumerate() {
        let (blk, o) = (oc / OC, oc % OC);
        for (t, &v) in wo.iter().enumerate() {
            wt[(blk * depth + t) * OC + o] = v;
        }
    }
    // `fill` writes every element of the copy: reused scratch, no zeroed allocation (fresh
    // zero pages faulted in on every call).
    let copy = ctx.scratch_reused::<f32>(copy_len)?;
    // About 64k multiply-add instructions per task.
    let per_row = blocks * ow.div_ceil(PIX) * depth;
    let grain = (65536 / per_row.max(1)).clamp(1, oh);
    for b in 0..n {
        let xb = &x[b * image..(b + 1) * image];
        ctx.parallel_chunks(copy, pad.len, |start, chunk| {
            let ci = start / pad.len;
            pad.fill(&xb[ci * ih * iw..(ci + 1) * ih * iw], (ih, iw), chunk);
        })?;
        let yb = &mut y[b * m * plane..(b + 1) * m * plane];
        let zb = z.map(|z| &z[b * m * plane..(b + 1) * m * plane]);
        let yd = Disjoint::new(yb);
        // Without a fused sum, the bias and a ReLU or Clip are applied in registers; anything
        // else afterwards, row by row, by the general path's loop.
        let epilogue = match (zb, act) {
            // Nothing to apply: the sums are the output (-0.0 included, as without a pass).
            (None, Activation::None) if bias.is_none() => Some(Epilogue::Raw),
            (None, Activation::None) => Some(Epilogue::Bias),
            (None, Activation::Relu) => Some(Epilogue::Relu),
            (None, Activation::Clip(lo, hi)) => Some(Epilogue::Clip(lo, hi)),
            _ => None,
        };
        let epilogue = epilogue.map(|e| (e, bias));
        let rows = Rows {
            pad: &pad,
            copy,
            offsets: &offsets,
            wt: &wt,
            m,
        };
        ctx.parallel_for(oh, grain, |range| {
            // One list of row slices per task, refilled per output row.
            let mut outs: Vec<&mut [f32]> = try_with_capacity(m)?;
            for oy in range {
                outs.clear();
                // SAFETY: output row `oy` of every channel belongs to this task alone, and
                // the previous row's slices were dropped by `clear`.
                outs.extend((0..m).map(|oc| unsafe { yd.part(oc * plane + oy * ow, ow) }));
                rows.row(oy, &mut outs, epilogue);
                if epilogue.is_some() {
                    continue;
                }
                for (oc, out) in outs.iter_mut().enumerate() {
                    let at = oc * plane + oy * ow;
                    let bv = bias.map_or(0.0, |b| b[oc]);
                    finish_plane(out, bv, zb.map(|z| &z[at..at + ow]), act);
                }
            }
            Ok(())
        })?;
    }
    Ok(true)
}

/// What the micro-kernel applies to its sums before storing them (after the bias), as
/// [`Activation::apply`] does (NaN included).
#[derive(Clone, Copy)]
enum Epilogue {
    /// The sums as they are.
    Raw,
    /// The bias alone.
    Bias,
    Relu,
    Clip(f32, f32),
}

/// What computing one output row needs.
struct Rows<'a> {
    pad: &'a Padded,
    copy: &'a [f32],
    offsets: &'a [usize],
    wt: &'a [f32],
    m: usize,
}

impl Rows<'_> {
    /// Output row `oy` of every channel into `outs` (one slice of `ow` per output channel):
    /// the sums, plus the bias and the activation where `epilogue` is given.
    fn row(
        &self,
        oy: usize,
        outs: &mut [&mut [f32]],
        epilogue: Option<(Epilogue, Option<&[f32]>)>,
    ) {
        let pad = self.pad;
        let depth = self.offsets.len();
        // The reads of every run stay inside the copy by construction (`Padded::new` made
        // each phase row long enough for a last run of PIX, and `offsets` are its taps);
        // checked once here for the unchecked loads.
        if self.copy.len() < pad.len
            || outs.len() < self.m
            || outs.iter().any(|o| o.len() < pad.ow)
            || self.wt.len() < self.m.div_ceil(OC) * depth * OC
        {
            return;
        }
        let start = oy * pad.sh * pad.sw * pad.phase_len;
        for (blk, chunk) in outs.chunks_mut(OC).enumerate() {
            let w = &self.wt[blk * depth * OC..(blk + 1) * depth * OC];
            // The block's biases (zero past m or without B) and what follows them.
            let mut b = [0f32; OC];
            let epi = epilogue.map(|(e, bias)| {
                if let Some(bias) = bias {
                    for (o, v) in b.iter_mut().enumerate() {
                        *v = bias.get(blk * OC + o).copied().unwrap_or(0.0);
                    }
                }
                e
            });
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked the CPU's AVX-512; the lengths were checked above.
            unsafe {
                x86::block(self.copy, start, self.offsets, w, pad.ow, chunk, epi, &b)
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Epilogue, OC, PIX};
    use std::arch::x86_64::*;

    /// `v + b`, then the epilogue's activation; `v` unchanged without an epilogue (applied
    /// afterwards) or with [`Epilogue::Raw`].
    #[target_feature(enable = "avx512f")]
    fn finish(v: __m512, b: f32, epi: Option<Epilogue>) -> __m512 {
        let Some(epi) = epi else {
            return v;
        };
        if let Epilogue::Raw = epi {
            return v;
        }
        let v = _mm512_add_ps(v, _mm512_set1_ps(b));
        match epi {
            Epilogue::Raw | Epilogue::Bias => v,
            // f32::max(NaN, 0) is 0: `max` returns its second operand when either is NaN.
            Epilogue::Relu => _mm512_max_ps(v, _mm512_setzero_ps()),
            // NaN stays NaN.
            Epilogue::Clip(lo, hi) => {
                _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), v))
            }
        }
    }

    /// `outs[o][j] = Σ_t w[t * OC + o] * copy[start + offsets[t] + j]` for `j < ow` and
    /// each of the (at most [`OC`]) output rows in `outs`, [`PIX`] pixels at a time; with an
    /// epilogue, plus `b[o]` and the activation.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `start + offsets[t] + ow.div_ceil(PIX) * PIX <= copy.len()`
    /// for every tap; `w.len() >= offsets.len() * OC`; every row of `outs` holds `ow` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        copy: &[f32],
        start: usize,
        offsets: &[usize],
        w: &[f32],
        ow: usize,
        outs: &mut [&mut [f32]],
        epi: Option<Epilogue>,
        b: &[f32; OC],
    ) {
        let (p, wp) = (copy.as_ptr().add(start), w.as_ptr());
        for j0 in (0..ow).step_by(PIX) {
            let mut acc = [_mm512_setzero_ps(); OC];
            for (t, &off) in offsets.iter().enumerate() {
                let xv = _mm512_loadu_ps(p.add(off + j0));
                let wt = wp.add(t * OC);
                for (o, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*wt.add(o)), xv, *a);
                }
            }
            let mask = if ow - j0 >= PIX {
                u16::MAX
            } else {
                (1u16 << (ow - j0)) - 1
            };
            for ((out, a), &bo) in outs.iter_mut().zip(acc).zip(b) {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(j0), mask, finish(a, bo, epi));
            }
        }
    }
}
