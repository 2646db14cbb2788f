//! 2-D convolutions of images with few channels (a CNN's first layer: three colour planes, or
//! one grey plane) with output *pixels* in the lanes, written straight into the NCHW planes.
//!
//! [`super::direct`] puts output channels in the lanes and turns each tile of at most 14
//! pixels back to planes (16x16 register transposes, masked stores of 14 floats). On a first
//! layer a pixel has only 27 (3x3) or 147 (7x7) multiply-adds per output channel, and perf of
//! SqueezeNet's 3x3/2 first layer at one thread had the turn and the channels-last copy at
//! half of the layer's samples, the multiply-adds at the other half (0.59 ms for 64x3x3x3 over
//! 224x224, ONNX Runtime's NCHWc kernel 0.40 with its reorders). Here a tile is [`R`] output
//! channels x up to [`MAX_V`] registers (96 pixels) of one output row: per tap, one load of x
//! per register, `R` broadcast weights and `R x V` multiply-adds; the sums go to the planes as
//! whole registers.
//!
//! x is read through a zero-padded copy split into `stride` column phases (phase `f` of a row
//! holds the padded columns `f, f + s, f + 2s, ...`: the per-plane depthwise loop's copy,
//! [`super::depthwise::Padded`]), so that the sixteen outputs of a register
//! read sixteen consecutive floats for every tap, whatever the stride and dilation: tap `kx`
//! reads phase `(kx * d) % s` from column `ox + (kx * d) / s`. With few channels the copy is
//! about the image's size. With many channels the channels-in-lanes tiles of [`super::direct`]
//! reuse each loaded value more and stay the better choice ([`MAX_C`]).
//!
//! Y may be channels-last (`opreg::FusedConvNhwc` with `y_nhwc`, where the `nhwc-conv` pass
//! carries the stem's output through a channels-last MaxPool): a tile's [`R`] channels x 16
//! pixels are then turned in registers (two rounds of shuffles) into each pixel's [`R`]
//! channels, stored as two runs of four. On SqueezeNet's first layer (64x3x3x3 over 224x224,
//! one thread) that took 0.39 ms, the channels-in-lanes kernel (which stores channels-last
//! without a turn) 0.43, and the NCHW store here 0.33.
//!
//! On AVX2 + FMA (16 registers of 8 lanes) a tile is [`R`] channels x one register of 8
//! pixels ([`avx2`]), for windows of up to [`AVX2_MAX_WINDOW`] taps.

use super::depthwise::Padded;
use super::direct::Isa;
use super::Activation;
use crate::nn::{pool::MaxRows, Disjoint, Geometry};
use crate::util::TaskScratch;
use opreg_sdk::{
    alloc::{checked_numel, try_vec},
    prelude::*,
};

/// f32 lanes of an AVX-512 register.
const LANES: usize = 16;
/// Output channels per tile (one broadcast weight each per tap).
const R: usize = 8;
/// Registers of pixels per tile at most: `R * MAX_V` = 24 registers of sums, the tap's
/// `MAX_V` registers of x and a broadcast weight, 31 of the 32. (Seven registers, a whole
/// 112-pixel row per tile, needed 36 and spilled: ResNet's 7x7 first layer ran 15 % slower
/// than the channels-in-lanes kernel.)
const MAX_V: usize = 3;
/// Input channels up to which this module takes a layer.
const MAX_C: usize = 4;
/// Floats of an image's phase copy up to which a batch runs one task per image (64 KiB per
/// thread's copy, in L2 with its output rows).
const SMALL_COPY: usize = 1 << 14;
/// Output width from which it takes a layer: narrower rows leave lanes of their last
/// register idle (at 32, at most a quarter).
const MIN_WIDTH: usize = 2 * LANES;

/// Whether this module computes the convolution of `x` (shape `xs`, NCHW) in geometry `g`
/// with `group` groups: 2-D, one group, at most [`MAX_C`] input channels, a window past 1x1,
/// rows of at least [`MIN_WIDTH`] outputs, on a CPU with AVX-512, or AVX2 + FMA ([`Isa`]) for
/// windows of at most [`AVX2_MAX_WINDOW`] taps.
pub(super) fn applies(xs: &[usize], g: &Geometry, group: usize) -> bool {
    xs.len() == 4
        && g.kernel.len() == 2
        && g.out.len() == 2
        && group == 1
        && (1..=MAX_C).contains(&xs[1])
        && g.kernel.iter().all(|&k| k > 0)
        && g.kernel[0].saturating_mul(g.kernel[1]) > 1
        && g.out[1] >= MIN_WIDTH
        && match Isa::detect() {
            Some(Isa::Avx512) => true,
            Some(Isa::Avx2) => g.kernel[0].saturating_mul(g.kernel[1]) <= AVX2_MAX_WINDOW,
            None => false,
        }
}

/// Output channels from which a layer with a channels-last Y goes to [`super::direct`]
/// instead, on AVX-512: the channels-in-lanes tiles store each pixel's channels as they are,
/// where this module turns its 8-channel x 16-pixel tiles (two rounds of shuffles, then 16-byte
/// stores; a third of SqueezeNet's first layer at one thread). Measured at 2 threads on
/// Emerald Rapids: SqueezeNet's 64-channel 3x3/2 layer 0.40-0.43 -> 0.37 ms, ResNet-50's
/// 64-channel 7x7/2 1.09-1.19 -> 1.03-1.04; MobileNetV2's 32-channel one 0.22 -> 0.22-0.24 (so
/// it stays here). AVX2 keeps its own tiles (measured faster on Zen 3 in stop 58).
const NHWC_DIRECT_FROM: usize = 64;

/// Whether a layer of `m` output channels that [`applies`] computes here when Y is
/// channels-last (`y_nhwc`); else [`super::direct`] takes it.
pub(super) fn keeps(m: usize, y_nhwc: bool) -> bool {
    !(y_nhwc && m >= NHWC_DIRECT_FROM && Isa::detect() == Some(Isa::Avx512))
}

/// Window taps up to which AVX2 CPUs take a layer here. A wider window has taps enough that
/// the channels-in-lanes tiles' denser loop (16 channels x 6 pixels per tap) outweighs their
/// turn back to NCHW: ResNet's 7x7/2 first layer (64 channels over 224x224, one thread,
/// Zen 3) took 3.3-3.6 ms there against 3.4-3.8 here; SqueezeNet's 3x3/2 one 1.3-1.6
/// against 0.9-1.0 here.
pub(super) const AVX2_MAX_WINDOW: usize = 9;

/// `W` (`m x c x kh x kw`) in blocks of [`R`] output channels, each tap's `R` weights
/// together: `wt[(blk * depth + t) * R + o]` with `t = (ic * kh + ky) * kw + kx`, zero for
/// the channels past m. Built once at load for constant weights, else per call.
pub(super) fn pack(
    w: &[f32],
    m: usize,
    c: usize,
    (kh, kw): (usize, usize),
) -> Result<Vec<f32>, PluginError> {
    let depth = checked_numel(&[c, kh, kw])?;
    let blocks = m.div_ceil(R);
    let mut wt = try_vec(checked_numel(&[blocks, depth, R])?, 0.0f32)?;
    if depth == 0 || w.len() < checked_numel(&[m, depth])? {
        return Ok(wt);
    }
    for (oc, wo) in w.chunks_exact(depth).take(m).enumerate() {
        let (blk, o) = (oc / R, oc % R);
        for (t, &v) in wo.iter().enumerate() {
            wt[(blk * depth + t) * R + o] = v;
        }
    }
    Ok(wt)
}

/// The convolution into `y` (`n x m x oh x ow`, NCHW), then `act((y + bias) + z)` per element
/// (`z` of y's shape; the sums rounded in the unfused graph's order, as [`super::direct`]);
/// `packed` is [`pack`] of `w` when built at load. `Ok(false)` (nothing written) where the
/// copy would be much larger than x.
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
    (y, y_nhwc): (&mut [f32], bool),
) -> Result<bool, PluginError> {
    let n = xs[0];
    let (oh, ow) = (g.out[0], g.out[1]);
    let plane = oh * ow;
    if y.is_empty() || plane == 0 || m == 0 {
        return Ok(true);
    }
    let Some(layer) = Layer::new(xs, g, m, w, packed)? else {
        return Ok(false);
    };
    super::operands_fit(
        (x, w, y),
        bias,
        z,
        (n, layer.image),
        (m, layer.depth),
        plane,
    )?;
    let Layer {
        copy_len,
        blocks,
        image,
        ..
    } = layer;
    let tiles = |b: usize| Tiles {
        z: z.map(|z| &z[b * m * plane..(b + 1) * m * plane]),
        y_nhwc,
        ..layer.tiles(m, g, bias, act)
    };
    if n >= ctx.num_threads().max(2) && copy_len <= SMALL_COPY {
        // Small images, enough of them for every thread: one task per image, its copy and
        // every row (a text recognizer's 32x128 grey lines, batch 8: two parallel loops per
        // image, the copy of one plane on one thread, and the threads' hand-offs cost more
        // than the layer's multiply-adds). Large ones (224x224 colour images) measured the
        // same either way and keep the rows spread over the threads.
        return super::per_image_tasks(ctx, n, (y, m * plane), copy_len, |copy, b, yb| {
            layer.fill(&x[b * image..(b + 1) * image], copy);
            tiles(b).rows(copy, 0..oh, blocks, yb);
            Ok(())
        });
    }
    let copy = ctx.scratch_reused::<f32>(copy_len)?;
    let rows_per_task = oh.div_ceil(4 * ctx.num_threads().max(1)).max(1);
    for b in 0..n {
        layer.fill_parallel(ctx, &x[b * image..(b + 1) * image], copy)?;
        let yd = Disjoint::new(&mut y[b * m * plane..(b + 1) * m * plane]);
        let copy = &*copy;
        let tiles = tiles(b);
        ctx.parallel_for(oh, rows_per_task, |rows| {
            tiles.rows(copy, rows, blocks, &yd);
            Ok(())
        })?;
    }
    Ok(true)
}

/// Pooled output rows per step of [`run_pooled`]'s tasks: 4 rows of a 3x3/2 pool read 9 rows
/// of the convolution (8 new after the first step), 32 KiB for 8 channels of 111 columns: in
/// L1 while the pool reads them.
const POOL_STEP: usize = 4;

/// [`run`] followed by the MaxPool `pool` (`opreg::FusedConvMaxPool`, NCHW, no Z): each task
/// takes a band of the pool's output rows and, block by block, computes the rows of the
/// convolution those windows read into [`R`] scratch planes, a few rows at a time, and pools
/// them while they are in cache. The convolution's output never goes to memory whole: on
/// SqueezeNet's first layer 3.1 MB per image written by the convolution and read back by
/// the pool. Rows shared by two tasks' windows are computed by both (one row per band
/// boundary). `Ok(false)` (nothing written) where [`run`] would not take the layer or the pool
/// does not run in bands ([`MaxRows::in_bands`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn run_pooled(
    ctx: &KernelContext<'_>,
    xs: &[usize],
    g: &Geometry,
    m: usize,
    (x, w, packed): (&[f32], &[f32], Option<&[f32]>),
    bias: Option<&[f32]>,
    act: Activation,
    (pool, (ph, pw)): (&MaxRows, (usize, usize)),
    y: &mut [f32],
) -> Result<bool, PluginError> {
    let n = xs[0];
    let (oh, ow) = (g.out[0], g.out[1]);
    let (plane, pooled) = (oh * ow, ph * pw);
    if y.is_empty() || pooled == 0 || m == 0 {
        return Ok(true);
    }
    if !pool.in_bands() || plane == 0 {
        return Ok(false);
    }
    let Some(layer) = Layer::new(xs, g, m, w, packed)? else {
        return Ok(false);
    };
    super::operands_fit(
        (x, w, &[]),
        bias,
        None,
        (n, layer.image),
        (m, layer.depth),
        0,
    )?;
    if y.len() < checked_numel(&[n, m, pooled])? {
        return Err(PluginError::invalid(
            "FusedConvMaxPool: Y is shorter than its shape",
        ));
    }
    let Layer {
        copy_len,
        blocks,
        image,
        ..
    } = layer;
    // Scratch planes at their own places in a block (`local`), full size so that the pool's
    // row offsets hold; only the rows a task computes are touched.
    let tiles = Tiles {
        local: true,
        ..layer.tiles(m, g, bias, act)
    };
    let copy = ctx.scratch_reused::<f32>(copy_len)?;
    let planes = TaskScratch::<f32>::new(ctx, checked_numel(&[R, plane])?);
    let rows_per_task = ph.div_ceil(2 * ctx.num_threads().max(1)).max(1);
    for b in 0..n {
        layer.fill_parallel(ctx, &x[b * image..(b + 1) * image], copy)?;
        let yd = Disjoint::new(&mut y[b * m * pooled..(b + 1) * m * pooled]);
        let (copy, tiles) = (&*copy, &tiles);
        ctx.parallel_for(ph, rows_per_task, |band| {
            let mut scratch = planes.take()?;
            for blk in 0..blocks {
                // The convolution rows in the scratch so far (the band's steps read rows in
                // order, each step's first one maybe the last step's last).
                let mut held = 0..0;
                for first in band.clone().step_by(POOL_STEP) {
                    let rows = first..(first + POOL_STEP).min(band.end);
                    let need = pool.input_rows(rows.clone());
                    let from = if held.contains(&need.start) {
                        held.end
                    } else {
                        need.start
                    };
                    {
                        let sd = Disjoint::new(&mut scratch[..]);
                        for oy in from..need.end {
                            tiles.row(copy, oy, blk, &sd);
                        }
                    }
                    held = need;
                    for (o, xp) in scratch.chunks_exact(plane).enumerate() {
                        let oc = blk * R + o;
                        if oc >= m {
                            break;
                        }
                        // SAFETY: rows `rows` of channel `oc`'s pooled plane are written by
                        // this task alone (the bands are disjoint).
                        let out = unsafe { yd.part(oc * pooled + first * pw, rows.len() * pw) };
                        if !pool.rows(xp, first, out) {
                            return Err(PluginError::internal(
                                "FusedConvMaxPool: the pool does not run in bands",
                            ));
                        }
                    }
                }
            }
            Ok(())
        })?;
    }
    Ok(true)
}

/// What computing a layer's tiles needs, once per call: the phase copy's geometry, the
/// weights regrouped, and where each tap reads in the copy.
struct Layer<'a> {
    pad: Padded,
    /// Floats of one image's copy (all its channels).
    copy_len: usize,
    /// Weights per output channel (`c * kh * kw`).
    depth: usize,
    blocks: usize,
    /// Floats of one input image, and of one of its planes.
    image: usize,
    in_plane: usize,
    in_hw: (usize, usize),
    wt: std::borrow::Cow<'a, [f32]>,
    taps: Vec<usize>,
    row_step: usize,
}

impl<'a> Layer<'a> {
    /// The layer of X's shape `xs` in geometry `g` with `m` filters `w` (`packed`: [`pack`] of
    /// them, when built at load); `None` where the copy would be much larger than X.
    fn new(
        xs: &[usize],
        g: &Geometry,
        m: usize,
        w: &[f32],
        packed: Option<&'a [f32]>,
    ) -> Result<Option<Self>, PluginError> {
        let (c, ih, iw) = (xs[1], xs[2], xs[3]);
        let (oh, ow) = (g.out[0], g.out[1]);
        let (kh, kw) = (g.kernel[0], g.kernel[1]);
        // Each channel's plane padded and split into column phases as the depthwise loop
        // copies it (its `Padded`), one plane after another.
        let Ok(pad) = Padded::new(g, (oh, ow), LANES) else {
            return Ok(None);
        };
        let image = checked_numel(&[c, ih, iw])?;
        let Some(copy_len) = c
            .checked_mul(pad.len)
            .filter(|&l| l <= 2 * image + (1 << 16))
        else {
            return Ok(None);
        };
        let depth = checked_numel(&[c, kh, kw])?;
        let blocks = m.div_ceil(R);
        let wt = match packed {
            Some(p) if p.len() == blocks * depth * R => std::borrow::Cow::Borrowed(p),
            _ => std::borrow::Cow::Owned(pack(w, m, c, (kh, kw))?),
        };
        // Per tap, where it reads in the copy relative to an output row's first read (padded
        // row `oy * sh + ky * dh`, phase `(kx * dw) % sw`, column `ox + (kx * dw) / sw`).
        let mut taps = try_vec(depth, 0usize)?;
        for ic in 0..c {
            for ky in 0..kh {
                for kx in 0..kw {
                    let (f, j) = ((kx * pad.dw) % pad.sw, (kx * pad.dw) / pad.sw);
                    taps[(ic * kh + ky) * kw + kx] =
                        ic * pad.len + ((ky * pad.dh) * pad.sw + f) * pad.phase_len + j;
                }
            }
        }
        let row_step = pad.sh * pad.sw * pad.phase_len;
        // Every read of every tile lies in the copy: the last row's last tap reads up to the
        // end of its phase row (`phase_len` covers the row's registers and the widest tap),
        // checked once for the unchecked loads.
        let last_read = oh.saturating_sub(1) * row_step + taps.iter().max().copied().unwrap_or(0);
        if last_read + ow.div_ceil(LANES) * LANES > copy_len || wt.len() < blocks * depth * R {
            return Err(PluginError::internal(
                "Conv: the phase copy or the weights are shorter than the tiles read",
            ));
        }
        Ok(Some(Layer {
            pad,
            copy_len,
            depth,
            blocks,
            image,
            in_plane: ih * iw,
            in_hw: (ih, iw),
            wt,
            taps,
            row_step,
        }))
    }

    /// Image `xb`'s copy into `copy` (its `copy_len` floats).
    fn fill(&self, xb: &[f32], copy: &mut [f32]) {
        for (ic, chunk) in copy.chunks_mut(self.pad.len).enumerate() {
            self.fill_channel(xb, ic, chunk);
        }
    }

    /// [`fill`](Self::fill) with one task per channel.
    fn fill_parallel(
        &self,
        ctx: &KernelContext<'_>,
        xb: &[f32],
        copy: &mut [f32],
    ) -> Result<(), PluginError> {
        ctx.parallel_chunks(copy, self.pad.len, |start, chunk| {
            self.fill_channel(xb, start / self.pad.len, chunk)
        })
    }

    /// Channel `ic` of image `xb` into its part of the copy.
    fn fill_channel(&self, xb: &[f32], ic: usize, chunk: &mut [f32]) {
        let plane = &xb[ic * self.in_plane..(ic + 1) * self.in_plane];
        self.pad.fill(plane, self.in_hw, chunk);
    }

    /// The tiles of an NCHW output without a Z (the callers set those they have).
    fn tiles<'t>(
        &'t self,
        m: usize,
        g: &Geometry,
        bias: Option<&'t [f32]>,
        act: Activation,
    ) -> Tiles<'t> {
        Tiles {
            taps: &self.taps,
            wt: &self.wt,
            depth: self.depth,
            m,
            ow: g.out[1],
            plane: g.out[0] * g.out[1],
            row_step: self.row_step,
            bias,
            z: None,
            act,
            y_nhwc: false,
            local: false,
            // `applies` found one (AVX2 where nothing else would run these tiles).
            isa: Isa::detect().unwrap_or(Isa::Avx2),
        }
    }
}

/// What computing the tiles of one image needs.
struct Tiles<'a> {
    taps: &'a [usize],
    wt: &'a [f32],
    depth: usize,
    m: usize,
    ow: usize,
    plane: usize,
    /// Copy floats from one output row's reads to the next's.
    row_step: usize,
    bias: Option<&'a [f32]>,
    /// The image's fused sum, of its output's shape and layout.
    z: Option<&'a [f32]>,
    act: Activation,
    /// Y channels-last: pixel `p`'s channel `oc` at `p * m + oc`.
    y_nhwc: bool,
    /// Y is [`R`] planes of one block's channels (a scratch), not all `m` planes: channel `oc`
    /// of block `blk` at plane `oc - blk * R`.
    local: bool,
    /// The vector unit of the tiles.
    isa: Isa,
}

impl Tiles<'_> {
    /// Output rows `rows` of every block of channels. NCHW, block by block: the block's planes
    /// written in long runs (row after row of 8 planes, not short runs into all of them: 0.36
    /// -> 0.31 ms on SqueezeNet's first layer). Channels-last, row by row: a pixel's channels
    /// share cache lines, which block by block were each written 8 times over a whole
    /// image's rows (2.1x the NCHW layer's time on SqueezeNet's first layer).
    fn rows(&self, copy: &[f32], rows: std::ops::Range<usize>, blocks: usize, yd: &Disjoint<f32>) {
        if self.y_nhwc {
            for oy in rows {
                for blk in 0..blocks {
                    self.row(copy, oy, blk, yd);
                }
            }
        } else {
            for blk in 0..blocks {
                for oy in rows.clone() {
                    self.row(copy, oy, blk, yd);
                }
            }
        }
    }

    /// Output row `oy` of block `blk`'s channels, in tiles of at most [`MAX_V`] registers
    /// (AVX2: one register of 8 pixels per tile).
    fn row(&self, copy: &[f32], oy: usize, blk: usize, yd: &Disjoint<f32>) {
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx2 {
            for v in 0..self.ow.div_ceil(avx2::L) {
                // SAFETY: `applies` checked AVX2 and FMA; as below (a register of 8 pixels
                // reads inside the 16 that the copy holds for its register of 16).
                unsafe { avx2::tile(self, copy, oy, blk, v, yd) };
            }
            return;
        }
        // Tiles of balanced widths (7 registers: 3, 2, 2).
        let regs = self.ow.div_ceil(LANES);
        let tiles = regs.div_ceil(MAX_V);
        let mut v0 = 0;
        for k in 0..tiles {
            let v = regs / tiles + usize::from(k < regs % tiles);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked AVX-512; `run` checked that every read of the row's
            // tiles lies in the copy and the weights hold the block's; the tile's stores lie
            // in row `oy` of the block's channels, which only this task writes.
            unsafe {
                x86::tile(self, copy, oy, blk, v0, v, yd)
            };
            v0 += v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tiles, LANES, R};
    use crate::nn::Disjoint;
    use std::arch::x86_64::*;

    /// Registers `v0..v0 + v` (`v` in 1..=[`super::MAX_V`]) of output row `oy`, block
    /// `blk`'s channels.
    ///
    /// # Safety
    /// The CPU has AVX-512F; every tap of the tile reads inside `copy`; the weights hold the
    /// block's; this task alone writes row `oy` of the block's channels.
    pub(super) unsafe fn tile(
        t: &Tiles<'_>,
        copy: &[f32],
        oy: usize,
        blk: usize,
        v0: usize,
        v: usize,
        yd: &Disjoint<f32>,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match v {
                1 => sums::<1>(t, copy, oy, blk, v0, yd),
                2 => sums::<2>(t, copy, oy, blk, v0, yd),
                _ => sums::<3>(t, copy, oy, blk, v0, yd),
            }
        }
    }

    /// [`tile`] for exactly `V` registers: the loop whose sums stay in registers, then the
    /// bias, the activation and the stores.
    #[target_feature(enable = "avx512f")]
    unsafe fn sums<const V: usize>(
        t: &Tiles<'_>,
        copy: &[f32],
        oy: usize,
        blk: usize,
        v0: usize,
        yd: &Disjoint<f32>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let base = copy.as_ptr().add(oy * t.row_step + v0 * LANES);
        let mut wp = t.wt.as_ptr().add(blk * t.depth * R);
        for &tap in t.taps {
            let q = base.add(tap);
            let mut xv = [_mm512_setzero_ps(); V];
            for (i, x) in xv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(q.add(i * LANES));
            }
            for (o, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*wp.add(o));
                for (s, &x) in a.iter_mut().zip(&xv) {
                    *s = _mm512_fmadd_ps(wv, x, *s);
                }
            }
            wp = wp.add(R);
        }
        let x0 = v0 * LANES;
        if t.y_nhwc {
            // Handed over by value once summed: indexed in place here, the sums lived in
            // memory and the loop above stored each one after every multiply-add.
            return tile_nhwc(t, acc, oy, blk, x0, yd);
        }
        for (o, a) in acc.iter().enumerate() {
            let oc = blk * R + o;
            if oc >= t.m {
                return;
            }
            // The bias added only when there is one (as `direct`: -0 stays -0 without).
            let bias = t.bias.map(|b| _mm512_set1_ps(b[oc]));
            for (i, &s) in a.iter().enumerate() {
                let x = x0 + i * LANES;
                let lanes = (t.ow - x).min(LANES);
                let mask = ((1u32 << lanes) - 1) as u16;
                let at = if t.local { o } else { oc } * t.plane + oy * t.ow + x;
                let mut v = bias.map_or(s, |b| _mm512_add_ps(s, b));
                if let Some(z) = t.z {
                    let zr = &z[at..at + lanes];
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, zr.as_ptr()));
                }
                let v = t.act.apply512(v);
                // SAFETY: the register's pixels lie in row `oy` of channel `oc`, written by
                // this task alone (caller).
                let out = yd.part(at, lanes);
                _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, v);
            }
        }
    }

    /// A tile's sums channels-last: the bias per channel, then each register column turned
    /// and stored ([`store_nhwc`]).
    ///
    /// # Safety
    /// As [`store_nhwc`].
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_nhwc<const V: usize>(
        t: &Tiles<'_>,
        mut acc: [[__m512; V]; R],
        oy: usize,
        blk: usize,
        x0: usize,
        yd: &Disjoint<f32>,
    ) {
        // The bias here; Z and the activation once turned (`store_nhwc`).
        for (o, a) in acc.iter_mut().enumerate() {
            let bias = t
                .bias
                .and_then(|b| b.get(blk * R + o))
                .map(|&b| _mm512_set1_ps(b));
            for s in a.iter_mut() {
                *s = bias.map_or(*s, |b| _mm512_add_ps(*s, b));
            }
        }
        // Register `i` of every channel's row: a column of the tile, not a walk over `acc`.
        #[allow(clippy::needless_range_loop)]
        for i in 0..V {
            let regs: [__m512; R] = std::array::from_fn(|o| acc[o][i]);
            store_nhwc(t, &regs, oy, blk, x0 + i * LANES, yd);
        }
    }

    // The turn below is written for tiles of 8 channels.
    const _: () = assert!(R == 8);

    /// One register column of a tile channels-last: `regs[o]` holds channel `blk * R + o` of
    /// the 16 pixels from column `x` of output row `oy` (the bias added); pixel `p`'s [`R`]
    /// channels go to `y[(oy * ow + x + p) * m + blk * R..]`, as two runs of four, Z (same
    /// places) added and the activation applied on the way, in the NCHW store's order.
    ///
    /// The turn: `unpacklo/hi` pairs channels (0,1), (2,3), ... per pixel, `shuffle_ps` then
    /// joins two pairs, so that register `q[k]` (`k` in 0..4) holds pixel `4L + k`'s channels
    /// 0-3 in its 128-bit lane `L`, and `q[4 + k]` the same pixels' channels 4-7. Each lane is
    /// stored as a run of four (fewer past m); pixels past the row's end are not.
    ///
    /// # Safety
    /// The CPU has AVX-512F; this task alone writes row `oy` of the block's channels.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_nhwc(
        t: &Tiles<'_>,
        regs: &[__m512; R],
        oy: usize,
        blk: usize,
        x: usize,
        yd: &Disjoint<f32>,
    ) {
        let pairs = |a: __m512, b: __m512| (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let (lo01, hi01) = pairs(regs[0], regs[1]);
        let (lo23, hi23) = pairs(regs[2], regs[3]);
        let (lo45, hi45) = pairs(regs[4], regs[5]);
        let (lo67, hi67) = pairs(regs[6], regs[7]);
        let q = [
            _mm512_shuffle_ps::<0x44>(lo01, lo23),
            _mm512_shuffle_ps::<0xEE>(lo01, lo23),
            _mm512_shuffle_ps::<0x44>(hi01, hi23),
            _mm512_shuffle_ps::<0xEE>(hi01, hi23),
            _mm512_shuffle_ps::<0x44>(lo45, lo67),
            _mm512_shuffle_ps::<0xEE>(lo45, lo67),
            _mm512_shuffle_ps::<0x44>(hi45, hi67),
            _mm512_shuffle_ps::<0xEE>(hi45, hi67),
        ];
        let oc0 = blk * R;
        // Channels of the block inside m, per run of four.
        let live = t.m.saturating_sub(oc0).min(R);
        let pixels = t.ow.saturating_sub(x).min(LANES);
        if live == R && pixels == LANES && t.z.is_none() {
            // The common case, without a check per run: 16 pixels of a whole block. Their
            // runs span one range of the row (checked once); pixel `p`'s starts `p * m` in.
            let m = t.m;
            let out = yd.part((oy * t.ow + x) * m + oc0, (LANES - 1) * m + R);
            let base = out.as_mut_ptr();
            for (j, &v) in q.iter().enumerate() {
                let v = t.act.apply512(v);
                // SAFETY: inside `out` (pixel `4 * lane + k`, channels `4 * half..+4`).
                let at = base.add((j % 4) * m + 4 * (j / 4));
                _mm_storeu_ps(at, _mm512_castps512_ps128(v));
                _mm_storeu_ps(at.add(4 * m), _mm512_extractf32x4_ps::<1>(v));
                _mm_storeu_ps(at.add(8 * m), _mm512_extractf32x4_ps::<2>(v));
                _mm_storeu_ps(at.add(12 * m), _mm512_extractf32x4_ps::<3>(v));
            }
            return;
        }
        for (j, &v) in q.iter().enumerate() {
            let (k, half) = (j % 4, j / 4);
            let count = live.saturating_sub(4 * half).min(4);
            if count == 0 {
                continue;
            }
            // Lane `lane` holds pixel `4 * lane + k`: where its run goes, if inside the row.
            let at = |lane: usize| {
                let p = 4 * lane + k;
                (p < pixels).then(|| (oy * t.ow + x + p) * t.m + oc0 + 4 * half)
            };
            let mut v = v;
            if let Some(z) = t.z {
                let mut zq = [_mm_setzero_ps(); 4];
                for (lane, zl) in zq.iter_mut().enumerate() {
                    if let Some(zr) = at(lane).and_then(|a| z.get(a..a + count)) {
                        let mut run = [0.0f32; 4];
                        run[..count].copy_from_slice(zr);
                        *zl = _mm_loadu_ps(run.as_ptr());
                    }
                }
                let zv = _mm512_insertf32x4::<1>(_mm512_castps128_ps512(zq[0]), zq[1]);
                let zv = _mm512_insertf32x4::<2>(zv, zq[2]);
                v = _mm512_add_ps(v, _mm512_insertf32x4::<3>(zv, zq[3]));
            }
            let v = t.act.apply512(v);
            // Each 128-bit lane stored whole (a masked 512-bit store from a pointer 16-48
            // bytes before the run measured 2.2x the NCHW layer's time).
            let runs = [
                _mm512_castps512_ps128(v),
                _mm512_extractf32x4_ps::<1>(v),
                _mm512_extractf32x4_ps::<2>(v),
                _mm512_extractf32x4_ps::<3>(v),
            ];
            for (lane, &r) in runs.iter().enumerate() {
                let Some(a) = at(lane) else {
                    continue;
                };
                // SAFETY: the pixel's channels of this block lie in row `oy`, written by this
                // task alone (caller).
                let out = yd.part(a, count);
                if count == 4 {
                    _mm_storeu_ps(out.as_mut_ptr(), r);
                } else {
                    let mut run = [0.0f32; 4];
                    _mm_storeu_ps(run.as_mut_ptr(), r);
                    out.copy_from_slice(&run[..count]);
                }
            }
        }
    }
}

/// The tiles on AVX2 + FMA: [`R`] output channels x one register of 8 pixels (8 sums, a
/// register of x and a broadcast weight of the 16 registers; two registers of pixels would
/// need 19 and spill), each tap one load of x, [`R`] broadcasts and [`R`] multiply-adds,
/// summed in the AVX-512 tiles' order (the same bits). Without it an AVX2 CPU ran first
/// layers through the channels-in-lanes kernel, whose tiles of 6 pixels are turned back to
/// NCHW by partial stores: SqueezeNet's 3x3/2 first layer (64 channels over 224x224) took
/// 1.3-2.4 ms at one thread on Zen 3, half of it in those stores.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::channels_last::x86::{store_first, transpose8};
    use super::{Tiles, R};
    use crate::nn::Disjoint;
    use std::arch::x86_64::*;

    /// f32 lanes of an AVX2 register.
    pub(super) const L: usize = 8;

    // The turn below is an 8x8 one.
    const _: () = assert!(R == L);

    /// The first `from.len()` (at most 8) floats of `from` in the low lanes, the rest zero.
    #[target_feature(enable = "avx")]
    fn load_first(from: &[f32]) -> __m256 {
        let mut run = [0.0f32; L];
        let n = from.len().min(L);
        run[..n].copy_from_slice(&from[..n]);
        // SAFETY: 8 floats.
        unsafe { _mm256_loadu_ps(run.as_ptr()) }
    }

    /// Register `v` (pixels `8v..8v + 8`) of output row `oy`, block `blk`'s channels: the
    /// taps, then the bias, Z and the activation, stored to the NCHW planes (one run of up to
    /// 8 pixels per channel) or channels-last (the tile turned 8x8, one run of up to 8
    /// channels per pixel).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; every tap of the tile reads inside `copy`; the weights hold
    /// the block's; this task alone writes row `oy` of the block's channels.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(
        t: &Tiles<'_>,
        copy: &[f32],
        oy: usize,
        blk: usize,
        v: usize,
        yd: &Disjoint<f32>,
    ) {
        let mut acc = [_mm256_setzero_ps(); R];
        // SAFETY (loop): the caller's copy and weights.
        unsafe {
            let base = copy.as_ptr().add(oy * t.row_step + v * L);
            let mut wp = t.wt.as_ptr().add(blk * t.depth * R);
            for &tap in t.taps {
                let x = _mm256_loadu_ps(base.add(tap));
                for (o, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*wp.add(o)), x, *a);
                }
                wp = wp.add(R);
            }
        }
        let x0 = v * L;
        let pixels = t.ow.saturating_sub(x0).min(L);
        let oc0 = blk * R;
        let live = t.m.saturating_sub(oc0).min(R);
        // The bias added only when there is one (as `direct`: -0 stays -0 without).
        if let Some(b) = t.bias {
            for (a, &b) in acc.iter_mut().zip(&b[oc0..oc0 + live]) {
                *a = _mm256_add_ps(*a, _mm256_set1_ps(b));
            }
        }
        if t.y_nhwc {
            for (p, &c) in transpose8(acc).iter().enumerate().take(pixels) {
                let at = (oy * t.ow + x0 + p) * t.m + oc0;
                let c = match t.z {
                    Some(z) => _mm256_add_ps(c, load_first(&z[at..at + live])),
                    None => c,
                };
                // SAFETY: the pixel's channels of this block lie in row `oy`, written by
                // this task alone (caller).
                store_first(unsafe { yd.part(at, live) }, t.act.apply256(c));
            }
            return;
        }
        for (o, &a) in acc.iter().enumerate().take(live) {
            let at = if t.local { o } else { oc0 + o } * t.plane + oy * t.ow + x0;
            let a = match t.z {
                Some(z) => _mm256_add_ps(a, load_first(&z[at..at + pixels])),
                None => a,
            };
            // SAFETY: the register's pixels lie in row `oy` of channel `oc0 + o`, written
            // by this task alone (caller).
            store_first(unsafe { yd.part(at, pixels) }, t.act.apply256(a));
        }
    }
}
