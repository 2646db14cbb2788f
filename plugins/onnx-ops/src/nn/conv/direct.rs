//! 2-D convolutions with few input channels (an image network's first layer: 3 channels,
//! 3x3 or 7x7), computed directly with AVX-512, output pixels in the lanes.
//!
//! Through im2col and the gemm such a layer is bound by memory, not arithmetic: each output
//! pixel gets a column of `c * kh * kw` values (27 for MobileNetV2's first layer) that is
//! written, packed again by the BLAS and multiplied in one shallow block: MobileNetV2's first
//! layer took 0.65 ms at 2 threads that way, four times ONNX Runtime's (which convolves it
//! directly, `MlasConvNchwFloatKernel`). Deeper layers are [`super::deep`]'s, with the output
//! channels in the lanes (here a deep layer wastes the rest of a 16-wide run per row: a
//! quarter of ResNet's 7x7 stage).
//!
//! Here each image is copied once into the zero-padded, phase-split form of [`Padded`] (every
//! tap of a run of outputs then reads one contiguous run of the copy, whatever the padding,
//! stride and dilation), and the output is computed [`OC`] output channels x [`RUNS`] runs of
//! [`PIX`] pixels at a time, the sums in registers: per tap [`RUNS`] loads and [`OC`]
//! broadcast weights feed `OC * RUNS` multiply-adds. Runs are taken row after row, so that a
//! narrow layer (one run per row) still fills the tile from the next rows. The bias, a fused
//! sum and the activation are applied in registers before the store.

use super::depthwise::Padded;
use super::{finish_plane, Activation};
use crate::nn::{Disjoint, Geometry};
use opreg_sdk::{
    alloc::{checked_numel, try_vec, try_with_capacity},
    prelude::*,
};

/// Output pixels per register (f32 lanes of an AVX-512 register).
const PIX: usize = 16;
/// Output channels computed together.
const OC: usize = 8;
/// Runs of [`PIX`] outputs computed together: `OC * RUNS` = 24 registers of sums, with the
/// runs' loads and a broadcast weight, 28 of the 32.
const RUNS: usize = 3;
/// At most this many input channels: with more, each output pixel's column is deep enough
/// for [`super::deep`]'s tiles (or the gemm) to run near their peak.
const MAX_CHANNELS: usize = 4;

/// Whether this module computes the convolution of `x` (shape `xs`) in geometry `g` with
/// `group` groups: 2-D, one group, at most [`MAX_CHANNELS`] input channels, on a CPU with
/// AVX-512.
pub(super) fn applies(xs: &[usize], g: &Geometry, group: usize) -> bool {
    xs.len() == 4
        && g.kernel.len() == 2
        && g.out.len() == 2
        && group == 1
        && (1..=MAX_CHANNELS).contains(&xs[1])
        && g.kernel.iter().all(|&k| k > 0)
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

/// `W` (`m x depth`, depth = c * kh * kw) regrouped per block of [`OC`] output channels,
/// tap-major: `wt[(blk * depth + t) * OC + o]`, zero for the channels past m. Built once at
/// load for constant weights, else per call.
pub(super) fn pack(w: &[f32], m: usize, depth: usize) -> Result<Vec<f32>, PluginError> {
    let blocks = m.div_ceil(OC);
    let mut wt = try_vec(checked_numel(&[blocks, depth, OC])?, 0.0f32)?;
    if depth > 0 {
        for (oc, wo) in w.chunks_exact(depth).take(m).enumerate() {
            let (blk, o) = (oc / OC, oc % OC);
            for (t, &v) in wo.iter().enumerate() {
                wt[(blk * depth + t) * OC + o] = v;
            }
        }
    }
    Ok(wt)
}

/// The convolution into `y` (`n x m x oh x ow`), then `act((y + bias) + z)` per element as
/// the general path's `finish` does; `packed` is [`pack`] of `w` when built at load.
/// `Ok(false)` (nothing written) where the padded copy would be much larger than x (huge pads
/// or dilations): the general path handles those.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    ctx: &KernelContext<'_>,
    xs: &[usize],
    g: &Geometry,
    m: usize,
    x: &[f32],
    w: &[f32],
    packed: Option<&[f32]>,
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
    let blocks = m.div_ceil(OC);
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
    let built;
    let wt = match packed {
        Some(p) if p.len() == blocks * depth * OC => p,
        _ => {
            built = pack(w, m, depth)?;
            &built[..]
        }
    };
    // `fill` writes every element of the copy: reused scratch, no zeroed allocation (fresh
    // zero pages faulted in on every call).
    let copy = ctx.scratch_reused::<f32>(copy_len)?;
    // Tasks of whole output rows (enough for a tile of RUNS runs, and about 64k
    // multiply-add instructions) x ranges of channel blocks, so that a layer with few rows
    // (14) still spreads over the threads.
    let runs_per_row = ow.div_ceil(PIX);
    let per_row = blocks * runs_per_row * depth;
    let rows_per_task = (65536 / per_row.max(1))
        .max(RUNS.div_ceil(runs_per_row))
        .clamp(1, oh);
    let row_tasks = oh.div_ceil(rows_per_task);
    let block_split = (4 * ctx.num_threads().max(1))
        .div_ceil(row_tasks)
        .clamp(1, blocks);
    // Without a fused sum or with SiLU/GELU, what registers do not apply is applied after the
    // tile, row by row, by the general path's loop.
    let act_in_registers = match act {
        Activation::None => Some(Act::None),
        Activation::Relu => Some(Act::Relu),
        Activation::Clip(lo, hi) => Some(Act::Clip(lo, hi)),
        Activation::LeakyRelu(a) => Some(Act::Leaky(a)),
        Activation::SiLU | Activation::Gelu => None,
    };
    for b in 0..n {
        let xb = &x[b * image..(b + 1) * image];
        ctx.parallel_chunks(copy, pad.len, |start, chunk| {
            let ci = start / pad.len;
            pad.fill(&xb[ci * ih * iw..(ci + 1) * ih * iw], (ih, iw), chunk);
        })?;
        let yb = &mut y[b * m * plane..(b + 1) * m * plane];
        let zb = z.map(|z| &z[b * m * plane..(b + 1) * m * plane]);
        let epilogue = act_in_registers.map(|act| Epilogue { bias, z: zb, act });
        let yd = Disjoint::new(yb);
        let tiles = Tiles {
            pad: &pad,
            copy,
            offsets: &offsets,
            wt,
            m,
            plane,
        };
        ctx.parallel_for(row_tasks * block_split, 1, |range| {
            let mut runs = try_with_capacity(rows_per_task * runs_per_row)?;
            for t in range {
                let (rt, bs) = (t / block_split, t % block_split);
                let rows = rt * rows_per_task..((rt + 1) * rows_per_task).min(oh);
                let blks = bs * blocks / block_split..(bs + 1) * blocks / block_split;
                runs.clear();
                runs.extend(
                    rows.clone()
                        .flat_map(|oy| (0..ow).step_by(PIX).map(move |j| (oy, j))),
                );
                tiles.compute(&runs, blks.clone(), &yd, epilogue);
                if epilogue.is_some() {
                    continue;
                }
                for oc in (blks.start * OC..blks.end * OC).take_while(|&oc| oc < m) {
                    for oy in rows.clone() {
                        let at = oc * plane + oy * ow;
                        // SAFETY: this task alone writes rows `rows` of the channels in `blks`.
                        let out = unsafe { yd.part(at, ow) };
                        let bv = bias.map_or(0.0, |b| b[oc]);
                        finish_plane(out, bv, zb.map(|z| &z[at..at + ow]), act);
                    }
                }
            }
            Ok(())
        })?;
    }
    Ok(true)
}

/// The activation applied in registers, as [`Activation::apply`] does (NaN included).
#[derive(Clone, Copy)]
enum Act {
    None,
    Relu,
    Clip(f32, f32),
    Leaky(f32),
}

/// What the tile applies to its sums before storing them: `act((v + bias) + z)`, the bias and
/// z only where given (so that without them the sums are stored as they are, -0.0 included,
/// as the unfused graph would).
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    /// The image's fused sum, of the output's shape.
    z: Option<&'a [f32]>,
    act: Act,
}

/// What computing tiles of one image needs.
struct Tiles<'a> {
    pad: &'a Padded,
    copy: &'a [f32],
    offsets: &'a [usize],
    wt: &'a [f32],
    m: usize,
    plane: usize,
}

impl Tiles<'_> {
    /// The runs `(oy, j0)` of output channel blocks `blks`, stored into `yd` (the image's
    /// output): the sums, plus the bias, sum and activation where `epilogue` is given.
    fn compute(
        &self,
        runs: &[(usize, usize)],
        blks: std::ops::Range<usize>,
        yd: &Disjoint<f32>,
        epilogue: Option<Epilogue<'_>>,
    ) {
        let pad = self.pad;
        let depth = self.offsets.len();
        // The reads of every run stay inside the copy by construction (`Padded::new` made
        // each phase row long enough for a last run of PIX, and `offsets` are its taps);
        // checked once here for the unchecked loads.
        if self.copy.len() < pad.len
            || self.wt.len() < self.m.div_ceil(OC) * depth * OC
            || blks.end > self.m.div_ceil(OC)
            || runs.iter().any(|&(oy, j)| oy >= pad.oh || j >= pad.ow)
        {
            return;
        }
        let row_len = pad.sh * pad.sw * pad.phase_len;
        for blk in blks {
            let w = &self.wt[blk * depth * OC..(blk + 1) * depth * OC];
            for tile in runs.chunks(RUNS) {
                let mut starts = [0usize; RUNS];
                for (s, &(oy, j)) in starts.iter_mut().zip(tile) {
                    *s = oy * row_len + j;
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `applies` checked the CPU's AVX-512; the lengths were checked above
                // and each run is a disjoint part of the rows of this task's channels.
                unsafe {
                    let sums = x86::tile(self.copy, &starts[..tile.len()], self.offsets, w);
                    for (o, row) in sums.iter().enumerate() {
                        let oc = blk * OC + o;
                        if oc >= self.m {
                            break;
                        }
                        for (&v, &(oy, j)) in row.iter().zip(tile) {
                            let at = oc * self.plane + oy * pad.ow + j;
                            let len = (pad.ow - j).min(PIX);
                            x86::store(v, yd.part(at, len), oc, at, epilogue);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Act, Epilogue, OC, PIX, RUNS};
    use std::arch::x86_64::*;

    /// `sums[o][r][j] = Σ_t w[t * OC + o] * copy[starts[r] + offsets[t] + j]` for the (at
    /// most [`RUNS`]) runs starting at `starts`, each [`PIX`] outputs; rows of `sums` past
    /// `starts.len()` are zero.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `starts[r] + offsets[t] + PIX <= copy.len()` for every run
    /// and tap; `w.len() >= offsets.len() * OC`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        copy: &[f32],
        starts: &[usize],
        offsets: &[usize],
        w: &[f32],
    ) -> [[__m512; RUNS]; OC] {
        match *starts {
            [a, b, c] => sums::<3>(copy, [a, b, c], offsets, w),
            [a, b] => pad_runs(sums::<2>(copy, [a, b], offsets, w)),
            [a] => pad_runs(sums::<1>(copy, [a], offsets, w)),
            _ => [[_mm512_setzero_ps(); RUNS]; OC],
        }
    }

    #[target_feature(enable = "avx512f")]
    fn pad_runs<const R: usize>(s: [[__m512; R]; OC]) -> [[__m512; RUNS]; OC] {
        let mut out = [[_mm512_setzero_ps(); RUNS]; OC];
        for (o, row) in s.iter().enumerate() {
            out[o][..R].copy_from_slice(row);
        }
        out
    }

    /// [`tile`] for exactly `R` runs: the loop whose sums stay in registers.
    #[target_feature(enable = "avx512f")]
    unsafe fn sums<const R: usize>(
        copy: &[f32],
        starts: [usize; R],
        offsets: &[usize],
        w: &[f32],
    ) -> [[__m512; R]; OC] {
        let (p, wp) = (copy.as_ptr(), w.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); R]; OC];
        for (t, &off) in offsets.iter().enumerate() {
            let mut xv = [_mm512_setzero_ps(); R];
            for (v, &s) in xv.iter_mut().zip(&starts) {
                *v = _mm512_loadu_ps(p.add(s + off));
            }
            let wt = wp.add(t * OC);
            for (o, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*wt.add(o));
                for (ar, &xr) in a.iter_mut().zip(&xv) {
                    *ar = _mm512_fmadd_ps(wv, xr, *ar);
                }
            }
        }
        acc
    }

    /// Stores the first `out.len()` (at most [`PIX`]) lanes of `v` (output channel `oc`,
    /// element `at` of the image's output) into `out`, after the epilogue when given.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; with an epilogue its bias holds `oc` and its z element
    /// `at + out.len() - 1`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store(
        v: __m512,
        out: &mut [f32],
        oc: usize,
        at: usize,
        epilogue: Option<Epilogue<'_>>,
    ) {
        let n = out.len().min(PIX);
        let mask = if n == PIX { u16::MAX } else { (1u16 << n) - 1 };
        let mut v = v;
        if let Some(e) = epilogue {
            if let Some(b) = e.bias {
                v = _mm512_add_ps(v, _mm512_set1_ps(*b.get_unchecked(oc)));
            }
            if let Some(z) = e.z {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, z.as_ptr().add(at)));
            }
            v = match e.act {
                Act::None => v,
                // f32::max(NaN, 0) is 0: `max` returns its second operand when either is NaN.
                Act::Relu => _mm512_max_ps(v, _mm512_setzero_ps()),
                // NaN stays NaN.
                Act::Clip(lo, hi) => {
                    _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), v))
                }
                // `v < 0` is false for NaN, which stays.
                Act::Leaky(a) => {
                    let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_setzero_ps());
                    _mm512_mask_mul_ps(v, neg, v, _mm512_set1_ps(a))
                }
            };
        }
        _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, v);
    }
}
