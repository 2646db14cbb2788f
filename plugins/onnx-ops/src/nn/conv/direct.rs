//! 2-D convolutions with windows past 1x1 (a CNN's first layer and the 3x3 layers of its
//! body) computed directly with AVX-512 or AVX2 ([`Isa`]), output channels in the lanes,
//! without im2col.
//!
//! Through im2col and the gemm such a layer is bound by memory, not arithmetic. A 3x3 layer
//! writes a column matrix nine times its input (7.2 MB for ResNet's 56x56x64 layers, past the
//! caches) that the gemm reads and packs again: ResNet-18's 3x3 layers ran at ~105 GFLOP/s
//! that way, half of ONNX Runtime's (measured per node). A first layer (3 channels) gets a
//! column of 27 or 147 values per output pixel, multiplied in one shallow block: MobileNetV2's
//! took 0.65 ms at 2 threads that way, ONNX Runtime 0.3. ONNX Runtime convolves both directly
//! in its NCHWc layout, the channels in the lanes (`MlasConvNchwcFloatKernel`,
//! `MlasConvNchwFloatKernel`).
//!
//! Here each image is copied once, zero-padded, channels-last per block of [`CB`] input
//! channels (`copy[((blk * rows + row) * cols + col) * CB + ic % CB]`, so that every tap of an
//! output pixel reads one contiguous run of channels, whatever the stride and dilation, and a
//! tile's pixels lie a constant step apart), and the output is computed [`OCB`] output
//! channels (two registers) x up to [`MAX_PIX`] pixels of a row at a time, the sums in
//! registers: per tap and input channel, two loads of weights, one broadcast per pixel and two
//! multiply-adds per pixel (a layer of at most 16 output channels: one register x up to 16 pixels, so that
//! half of every multiply-add is not padding). [`GROUP`] tiles go through the input channels
//! together, a run of them at a time (see [`WEIGHTS_L1`]), their partial sums parked between
//! runs, so that the weights they share are read from L1. No lane is wasted whatever the row's width (ResNet's 7x7 stage included); output
//! pixels in the lanes (this module's earlier form) wasted the rest of a 16-wide run per row
//! and measured slower on every layer, the first layers included (MobileNetV2's 0.87 against
//! 0.27 ms). The tile is turned back to NCHW in registers, the bias, a fused sum and the
//! activation applied on the way. (A first layer of at most four channels with rows of 32 or
//! more outputs, NCHW out, goes to [`super::stem`] instead: its pixel tiles, read from a
//! phase-split copy, need no transpose, and measured 20-25 % faster on those layers.)

use super::channels_last::ChannelsLast;
use super::{Activation, Layouts};
use crate::nn::{Disjoint, Geometry};
use crate::util::TaskScratch;
use opreg_sdk::{
    alloc::{checked_numel, try_vec},
    prelude::*,
};

/// f32 lanes of an AVX-512 register.
const LANES: usize = 16;
/// Output channels per block with AVX-512: two registers (one for a layer of at most
/// [`LANES`]).
const OCB: usize = 2 * LANES;
/// Output pixels per tile at most with AVX-512: `2 * MAX_PIX` = 28 registers of sums, with two
/// of weights and a broadcast, 31 of the 32 (one register of channels: [`LANES`] pixels, 18). Every
/// pixel more per weight load counts: 14 against 12 measured 1.84 -> 1.48 ms on a 14x14
/// 256-channel layer at one thread (one tile per row instead of 12-pixel tiles along a 16-wide
/// line), 2-4 % elsewhere.
const MAX_PIX: usize = 14;
/// f32 lanes of an AVX2 register.
const LANES2: usize = 8;
/// Output pixels per tile at most with AVX2 and two registers of channels (16): 12 registers
/// of sums, two of weights and a broadcast, 15 of the 16 (the BLAS's 6x16 gemm tile, here
/// without im2col and packing); with one register (a layer of at most 8 channels), 12 (14).
const MAX_PIX2: usize = 6;
/// Floats of one tile's sums (the largest tile of either instruction set).
const TILE: usize = MAX_PIX * OCB;
/// Bytes of a block's weights (every tap, a run of input channels) that a group of tiles
/// shares per pass: they stay in L1 (48 KiB here) while each tile of the group reads them.
/// Read whole per tile they came from L2 (147 KiB for a 128-channel 3x3 block), two cache
/// lines per 28 multiply-adds, and the layer ran at ~70 % of the FMA peak against ONNX
/// Runtime's ~100 % (its NCHWc kernel walks input channels in blocks of 16 the same way).
const WEIGHTS_L1: usize = 20 * 1024;
/// Tiles that share the passes over the weights: their partial sums, `GROUP * TILE` floats
/// (28 KiB), stay in L1 or L2 between passes.
const GROUP: usize = 16;
/// Input channels per block of the copy. Within a block a pixel's channels lie [`CB`] floats
/// after the previous pixel's (`CB * stride`), so the multiply-add loop addresses a tile's
/// pixels as constant offsets from one pointer ([`x86::tile`] compiles those steps as
/// constants). Channels-last over all `c` channels, the step was `c` and each of the 14
/// broadcasts needed its address computed: 12 integer operations per 28 multiply-adds, some of
/// them issued on the two ports the multiply-adds use, the loop at ~16 cycles against 14.
/// The same 16 with AVX2: the loop broadcasts one input channel at a time, so the copy's
/// blocks need not match the registers' lanes.
const CB: usize = LANES;

/// The vector unit the tiles run on; its lanes size the blocks of output channels and the
/// tiles of pixels (and so the regrouped weights: [`pack`] and [`run`] must agree, which they
/// do on one CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// AVX-512 F: 32 registers of 16 lanes.
    Avx512,
    /// AVX2 with FMA: 16 registers of 8 lanes. Without it (AVX-512's kernels only), an AVX2
    /// CPU ran ResNet's 3x3 layers through im2col and the gemm at ~28 GFLOP/s (Zen 3, one
    /// thread: 8.1-8.4 ms for a 56x56 64->64 layer), ONNX Runtime's NCHWc kernel at ~2.5x
    /// that.
    Avx2,
}

#[cfg(test)]
thread_local! {
    /// Whether [`Isa::detect`] answers AVX2 on an AVX-512 CPU (on the test's thread, which
    /// loads and runs the kernel), so that both loops are tested there.
    pub(super) static TEST_AVX2: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Isa {
    /// The best this CPU has, if any (AVX2 where a test asks, see [`TEST_AVX2`]).
    pub(super) fn detect() -> Option<Isa> {
        #[cfg(test)]
        if TEST_AVX2.get() && crate::simd::has_avx2_fma() {
            return Some(Isa::Avx2);
        }
        if crate::simd::has_avx512() {
            Some(Isa::Avx512)
        } else if crate::simd::has_avx2_fma() {
            Some(Isa::Avx2)
        } else {
            None
        }
    }

    /// f32 lanes of a register.
    fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => LANES,
            Isa::Avx2 => LANES2,
        }
    }

    /// Output pixels per tile at most for a block of `ocb` channels.
    fn max_pixels(self, ocb: usize) -> usize {
        match (self, ocb == self.lanes()) {
            (Isa::Avx512, true) => LANES,
            (Isa::Avx512, false) => MAX_PIX,
            (Isa::Avx2, true) => 2 * MAX_PIX2,
            (Isa::Avx2, false) => MAX_PIX2,
        }
    }

    /// Output channels per block for a layer of `m`: two registers, or one for a layer of at
    /// most one register's worth.
    fn block_width(self, m: usize) -> usize {
        if m <= self.lanes() {
            self.lanes()
        } else {
            2 * self.lanes()
        }
    }
}
/// Whether this module computes the convolution of `x` (shape `xs`) in geometry `g` with
/// `group` groups: 2-D, one group, a window past 1x1 (a 1x1 layer is a plain gemm over x),
/// on a CPU with AVX-512 or AVX2 ([`Isa::detect`]).
pub(super) fn applies(xs: &[usize], g: &Geometry, group: usize) -> bool {
    xs.len() == 4
        && g.kernel.len() == 2
        && g.out.len() == 2
        && group == 1
        && xs[1] > 0
        && g.kernel.iter().all(|&k| k > 0)
        // Saturating: with no output channels, W is empty and its extents unbounded.
        && g.kernel[0].saturating_mul(g.kernel[1]) > 1
        && Isa::detect().is_some()
}

/// `W` (`m x c x kh x kw`) regrouped per block of `ocb` ([`Isa::block_width`]) output channels,
/// then per block of [`CB`] input channels (the copy's), tap-major within it: weight `o` of
/// tap `t = ky * kw + kx` and input channel `ic` (of block `b = ic / cb`, `cbl` channels) at
/// [`weight_at`]`(t, ic) * ocb + o` in the output block's `taps * c * ocb` values; zero for the
/// channels past m. A pass over one block of input channels then reads one contiguous run
/// of weights: tap-major over all `c` channels it read `taps` runs `c * ocb` floats apart,
/// which the prefetchers follow poorly from memory (the 4.7-9.4 MB of a ResNet's last 3x3
/// layers). Built once at load for constant weights, else per call.
pub(super) fn pack(
    w: &[f32],
    m: usize,
    c: usize,
    (kh, kw): (usize, usize),
) -> Result<Vec<f32>, PluginError> {
    // No unit, no tiles: `applies` is false and nothing reads the regrouping.
    let ocb = Isa::detect().map_or(OCB, |isa| isa.block_width(m));
    let blocks = m.div_ceil(ocb);
    let mut wt = try_vec(checked_numel(&[blocks, kh, kw, c, ocb])?, 0.0f32)?;
    let depth = checked_numel(&[c, kh, kw])?;
    if depth == 0 || w.len() < checked_numel(&[m, depth])? {
        return Ok(wt);
    }
    let (cb, taps) = (CB.min(c), kh * kw);
    for oc in 0..m {
        let (blk, o) = (oc / ocb, oc % ocb);
        for ic in 0..c {
            for ky in 0..kh {
                for kx in 0..kw {
                    let v = w[((oc * c + ic) * kh + ky) * kw + kx];
                    let at = weight_at((c, cb, taps), ky * kw + kx, ic);
                    wt[(blk * depth + at) * ocb + o] = v;
                }
            }
        }
    }
    Ok(wt)
}

/// Where tap `t`'s weights of input channel `ic` lie among an output block's (in units of
/// `ocb`): after the whole input-channel blocks before `ic`'s, tap-major within its block of
/// `cbl` channels (`cb`, the last block fewer). See [`pack`].
fn weight_at((c, cb, taps): (usize, usize, usize), t: usize, ic: usize) -> usize {
    let first = ic / cb.max(1) * cb;
    let cbl = cb.min(c - first);
    first * taps + t * cbl + (ic - first)
}

/// The convolution of `x` (`n x c x ih x iw`, or `n x ih x iw x c` when `layouts.x_nhwc`) into
/// `y` (`n x m x oh x ow`, or channels-last when `layouts.y_nhwc`), then `act((y + bias) + z)`
/// per element;
/// `packed` is [`pack`] of `w` when built at load. `Ok(false)` (nothing written) where the
/// padded copy would be much larger than x (huge pads or dilations): the general path
/// handles those.
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
    (y, layouts): (&mut [f32], Layouts),
) -> Result<bool, PluginError> {
    let y_nhwc = layouts.y_nhwc;
    let Some(isa) = Isa::detect() else {
        return Ok(false);
    };
    let (n, c, ih, iw) = (xs[0], xs[1], xs[2], xs[3]);
    let (oh, ow) = (g.out[0], g.out[1]);
    let (kh, kw) = (g.kernel[0], g.kernel[1]);
    let (sh, sw) = (g.strides[0].max(1), g.strides[1].max(1));
    let (dh, dw) = (g.dilations[0].max(1), g.dilations[1].max(1));
    // Non-empty y: its extents multiply without overflow.
    let plane = oh * ow;
    if y.is_empty() || plane == 0 || m == 0 {
        return Ok(true);
    }
    // A geometry whose copy would overflow or be much larger than x (huge pads or
    // dilations) is left to the general path. The copy is made per block of `cb` input
    // channels (see [`CB`]), each block's pixels `cb` floats apart.
    let cb = CB.min(c);
    let cblocks = c.div_ceil(cb);
    let Some(mut cp) = ChannelsLast::new(g, (cb, ih, iw), cb) else {
        return Ok(false);
    };
    // A channels-last image is copied a block of `cb` channels at a time too (runs of `cb`
    // floats every `c`): no transpose.
    cp.nhwc = layouts.x_nhwc;
    cp.pixel_step = if layouts.x_nhwc { c } else { cb };
    let cp_last = cp.with_channels(c - (cblocks - 1) * cb);
    let block_len = cp.len;
    let copy_len = checked_numel(&[cblocks, block_len])?;
    let row_len = cp.row_len();
    let rows_per_block = block_len / row_len.max(1);
    // Padded row `r` of the whole copy (block `r / rows_per_block`) from the image `xb`.
    let fill = |xb: &[f32], r: usize, dst: &mut [f32]| {
        let (blkc, r) = (r / rows_per_block, r % rows_per_block);
        let first = if layouts.x_nhwc {
            blkc * cb
        } else {
            blkc * cb * ih * iw
        };
        // (An empty image has no block past the first: `fill` then reads nothing, every row
        // lying in the padding.)
        let sub = xb.get(first..).unwrap_or_default();
        if blkc + 1 == cblocks {
            cp_last.fill(sub, r, dst);
        } else {
            cp.fill(sub, r, dst);
        }
    };
    let cols = cp.cols;
    let image = checked_numel(&[c, ih, iw])?;
    let depth = checked_numel(&[c, kh, kw])?;
    let ocb = isa.block_width(m);
    let blocks = m.div_ceil(ocb);
    let wt_len = checked_numel(&[blocks, depth, ocb])?;
    super::operands_fit((x, w, y), bias, z, (n, image), (m, depth), plane)?;
    // Per tap (ky, kx), its offset in the copy from an output pixel's first tap.
    let mut taps = try_vec(kh * kw, 0usize)?;
    for ky in 0..kh {
        for kx in 0..kw {
            taps[ky * kw + kx] = (ky * dh * cols + kx * dw) * cb;
        }
    }
    let built;
    let wt = match packed {
        Some(p) if p.len() == wt_len => p,
        _ => {
            built = pack(w, m, c, (kh, kw))?;
            &built[..]
        }
    };
    // `fill` writes every element of the copy: reused scratch, no zeroed allocation.
    let tiles = |b: usize| Tiles {
        taps: &taps,
        c,
        // (`applies` keeps c and the taps non-zero; `max` keeps this total regardless.)
        cb,
        block_len,
        chunk: (WEIGHTS_L1 / (4 * ocb * taps.len()).max(1)).clamp(1, cb),
        wt,
        depth,
        m,
        oh,
        ow,
        row_step: sh * cols * cb,
        pix_step: sw * cb,
        vertical: KernelRows {
            kh,
            sh,
            dh,
            pt: g.pad_begin[0],
            ih,
        },
        bias,
        z: z.map(|z| &z[b * m * plane..(b + 1) * m * plane]),
        act,
        y_nhwc,
        isa,
    };
    if n >= ctx.num_threads().max(2) {
        // Enough images to keep every thread busy: one task per image, each with its own
        // copy, instead of two parallel passes (copy, tiles) per image: a batch of small
        // images otherwise waits on the threads' hand-offs (the repo's toy CNN, batch 8).
        let sums = TaskScratch::<f32>::new(ctx, GROUP * TILE);
        return super::per_image_tasks(ctx, n, (y, m * plane), copy_len, |copy, b, yb| {
            let xb = &x[b * image..(b + 1) * image];
            for (r, chunk) in copy.chunks_mut(row_len).enumerate() {
                fill(xb, r, chunk);
            }
            let mut sums = sums.take()?;
            let t = tiles(b);
            for blk in 0..blocks {
                t.rows(copy, blk, 0..oh, yb, &mut sums)?;
            }
            Ok(())
        });
    }
    let copy = ctx.scratch_reused::<f32>(copy_len)?;
    // Tasks of (block, rows): about one group of tiles each (the passes over the weights are
    // shared within a task), cut further while there are fewer than four tasks per thread.
    let tiles_per_row = ow.div_ceil(isa.max_pixels(ocb));
    let mut rows_per_task = (GROUP / tiles_per_row).clamp(1, oh);
    while rows_per_task > 1 && blocks * oh.div_ceil(rows_per_task) < 4 * ctx.num_threads() {
        rows_per_task /= 2;
    }
    let row_tasks = oh.div_ceil(rows_per_task);
    // Which way the tasks split between the threads (each takes a contiguous run of them,
    // see `KernelContext::parallel_for`). Row-major (every block of output channels of a band
    // of rows per task run) where the weights are smaller than twice the copy: each core then
    // fills, reads and writes its own band of rows, and only the weights are read by both.
    // Block-major (all rows of a block of channels) otherwise, so that each core reads its
    // half of the weights: a deep layer's weights (9.4 MB for 512 channels) outweigh its
    // image. Block-major everywhere, a 56x56 64-channel layer read the whole copy on both
    // cores, half of it filled in the other's cache: four such layers ran at 1.37x ONNX
    // Runtime at 2 threads (1.04x at one), 1.09x split by rows.
    let row_major = wt.len() < 2 * copy_len;
    let sums = TaskScratch::<f32>::new(ctx, GROUP * TILE);
    for b in 0..n {
        let xb = &x[b * image..(b + 1) * image];
        if row_major {
            // Each thread fills the rows of every block of channels its band of output rows
            // reads (the tasks' first rows are the copy's first rows), not whole blocks.
            let cd = Disjoint::new(&mut copy[..]);
            ctx.parallel_for(rows_per_block, 1, |range| {
                for r in range {
                    for blkc in 0..cblocks {
                        let row = blkc * rows_per_block + r;
                        // SAFETY: each padded row of each block is filled by one task.
                        let dst = unsafe { cd.part(row * row_len, row_len) };
                        fill(xb, row, dst);
                    }
                }
                Ok(())
            })?;
        } else {
            ctx.parallel_chunks(copy, row_len, |start, chunk| {
                fill(xb, start / row_len, chunk);
            })?;
        }
        let yd = Disjoint::new(&mut y[b * m * plane..(b + 1) * m * plane]);
        let tiles = tiles(b);
        let copy = &*copy;
        ctx.parallel_for(blocks * row_tasks, 1, |range| {
            let mut sums = sums.take()?;
            for t in range {
                let (blk, rt) = if row_major {
                    (t % blocks, t / blocks)
                } else {
                    (t / row_tasks, t % row_tasks)
                };
                let rows = rt * rows_per_task..((rt + 1) * rows_per_task).min(oh);
                tiles.rows(copy, blk, rows, &yd, &mut sums)?;
            }
            Ok(())
        })?;
    }
    Ok(true)
}

/// What computing the tiles of one image needs.
struct Tiles<'a> {
    taps: &'a [usize],
    c: usize,
    /// Input channels per block of the copy (the floats between two pixels' channels), and
    /// floats per block.
    cb: usize,
    block_len: usize,
    /// Input channels per pass over a group of tiles (see [`WEIGHTS_L1`]).
    chunk: usize,
    wt: &'a [f32],
    depth: usize,
    m: usize,
    oh: usize,
    ow: usize,
    /// Copy elements from one output row's first tap to the next's, and from one pixel's.
    row_step: usize,
    pix_step: usize,
    /// Which kernel rows of an output row read the image, not the padding.
    vertical: KernelRows,
    bias: Option<&'a [f32]>,
    /// The image's fused sum, of the output's shape (and layout).
    z: Option<&'a [f32]>,
    act: Activation,
    /// Whether the output is channels-last (`oh x ow x m` per image): tiles are stored as
    /// they are computed, pixel by pixel, instead of turned to channel planes.
    y_nhwc: bool,
    /// The vector unit (detected once per call).
    isa: Isa,
}

/// One tile: its first tap's offset in the copy, its `p` pixels from `(oy, ox)` of one output
/// row, and the kernel rows its sums take (`ky.0..ky.1`: the others read only the padding).
#[derive(Clone, Copy, Debug)]
struct Tile {
    start: usize,
    p: usize,
    at: (usize, usize),
    ky: (usize, usize),
}

/// The vertical geometry: which kernel rows of output row `oy` read input rows, not the
/// padding. Summing only those skips what a padded copy would multiply by zero: a third of
/// the work of a 3x3 layer's first and last rows, which a text recognizer's feature maps
/// (2-8 rows, 32-64 columns) are mostly made of (its 2x32 layers ran at 1.57x ONNX Runtime,
/// whose NCHWc kernel skips those rows, `EffectiveKernelHeight`).
#[derive(Clone, Copy, Debug)]
struct KernelRows {
    kh: usize,
    sh: usize,
    dh: usize,
    /// The leading pad, and the input's rows.
    pt: usize,
    ih: usize,
}

impl KernelRows {
    /// The kernel rows `lo..hi` that read the image for output row `oy`: kernel row `ky` reads
    /// padded row `oy * sh + ky * dh`, input row `that - pt`, so the first ones may read the
    /// top padding and the last ones the bottom padding (none where every row does: pads past
    /// the kernel).
    fn span(&self, oy: usize) -> (usize, usize) {
        // First ky with `oy * sh + ky * dh >= bound` (`kh` if none).
        let first_at = |bound: usize| {
            bound
                .saturating_sub(oy.saturating_mul(self.sh))
                .div_ceil(self.dh.max(1))
                .min(self.kh)
        };
        let lo = first_at(self.pt);
        let hi = first_at(self.pt.saturating_add(self.ih));
        (lo, hi.max(lo))
    }
}

impl Tiles<'_> {
    /// Output rows `rows` of block `blk`'s channels from `copy` (the image's channels-last
    /// copy), into `yd` (the image's output).
    fn rows(
        &self,
        copy: &[f32],
        blk: usize,
        rows: std::ops::Range<usize>,
        yd: &Disjoint<f32>,
        sums: &mut [f32],
    ) -> Result<(), PluginError> {
        // The group's partial sums: task scratch, reused as it was left (each tile's first
        // pass overwrites its sums). A zeroed array here, 28 KiB per call, was 4 % of a
        // 16-channel 3x3 layer's time (memset in its profile).
        let (sums, _) = sums.as_chunks_mut::<TILE>();
        let ow = self.ow;
        let ocb = self.isa.block_width(self.m);
        let w = &self.wt[blk * self.depth * ocb..(blk + 1) * self.depth * ocb];
        // The reads of every tile stay inside the copy: the last pixel's last tap is the
        // copy's last element by construction (`run` sized it so); checked once here for the
        // unchecked loads.
        let last = (self.oh - 1) * self.row_step
            + (ow - 1) * self.pix_step
            + self.taps.last().copied().unwrap_or(0)
            + self.cb;
        if self.block_len < last
            || copy.len() < self.c.div_ceil(self.cb) * self.block_len
            || w.len() < self.taps.len() * self.c * ocb
            || rows.end > self.oh
            || sums.len() < GROUP
        {
            return Err(PluginError::internal(
                "Conv: the channels-last copy, the weights or the sums are shorter than the tiles need",
            ));
        }
        // Tiles of at most `max_pixels` pixels, as even as the row allows.
        let max_pix = self.isa.max_pixels(ocb);
        let tiles = ow.div_ceil(max_pix);
        let (base, extra) = (ow / tiles, ow % tiles);
        // Tiles stay within a row, so that each skips the kernel rows its row reads only
        // padding with. (Tiles run along consecutive rows, the pixels between two rows computed
        // and dropped, filled more of a narrow row's slots, but every kernel row was summed
        // for them: 7x7 and 2x32 512-channel layers measured 20-25 % slower that way.)
        // The tiles, computed GROUP at a time.
        // (Entries past `len` are never read.)
        let unused = Tile {
            start: 0,
            p: 0,
            at: (0, 0),
            ky: (0, 0),
        };
        let mut group = [unused; GROUP];
        let mut len = 0;
        macro_rules! push {
            ($t:expr) => {{
                group[len] = $t;
                len += 1;
                if len == GROUP {
                    self.group(copy, w, blk, &group, sums, yd);
                    len = 0;
                }
            }};
        }
        for oy in rows {
            let ky = self.vertical.span(oy);
            let mut ox = 0;
            for t in 0..tiles {
                let p = base + usize::from(t < extra);
                push!(Tile {
                    start: oy * self.row_step + ox * self.pix_step,
                    p,
                    at: (oy, ox),
                    ky,
                });
                ox += p;
            }
        }
        self.group(copy, w, blk, &group[..len], sums, yd);
        Ok(())
    }

    /// The tiles of `group` (checked by [`rows`](Self::rows) to read inside `copy` and `w`):
    /// the sums over the input channels a [`chunk`](Self::chunk) at a time, every tile
    /// taking one chunk before the next (the chunk's weights stay in L1), then stored.
    fn group(
        &self,
        copy: &[f32],
        w: &[f32],
        blk: usize,
        group: &[Tile],
        sums: &mut [[f32; TILE]],
        yd: &Disjoint<f32>,
    ) {
        // Block by block of the copy, a chunk of the block's channels at a time.
        for (blkc, base) in (0..self.c)
            .step_by(self.cb)
            .zip((0..).step_by(self.block_len))
        {
            let cn = self.cb.min(self.c - blkc);
            let mut i = 0;
            while i < cn {
                let n = self.chunk.min(cn - i);
                for (t, buf) in group.iter().zip(sums.iter_mut()) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `isa` was detected on this CPU; `rows` checked that every read
                    // lies inside the copy's blocks and the weights.
                    unsafe {
                        let start = copy.as_ptr().add(base + t.start + i);
                        let at = (t.p, t.ky);
                        match self.isa {
                            Isa::Avx512 => x86::tile(self, start, at, w, (blkc + i, n), buf),
                            Isa::Avx2 => avx2::tile(self, start, at, w, (blkc + i, n), buf),
                        }
                    };
                }
                i += n;
            }
        }
        for (t, buf) in group.iter().zip(sums.iter()) {
            let (oy, ox) = t.at;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as for the tile; the stores are bounds-checked parts of y.
            unsafe {
                let at = (oy, ox, t.p);
                match (self.isa, self.y_nhwc) {
                    (Isa::Avx512, true) => x86::store_nhwc(self, blk, at, buf, yd),
                    (Isa::Avx512, false) => x86::store(self, blk, at, buf, yd),
                    (Isa::Avx2, true) => avx2::store_nhwc(self, blk, at, buf, yd),
                    (Isa::Avx2, false) => avx2::store(self, blk, at, buf, yd),
                }
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::channels_last::x86::transpose16;
    use super::{Tiles, LANES, TILE};
    use crate::nn::Disjoint;
    use std::arch::x86_64::*;

    /// Pixels `ox..ox + p` of row `oy` from `buf` (`[pixel][channel]`)
    /// into block `blk`'s output channels of `yd`, turned in registers, with the bias, the
    /// fused sum and the activation.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; the tile lies inside the image's output (`p <= LANES`, and
    /// `p * ocb <= MAX_PIX * OCB`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store(
        t: &Tiles<'_>,
        blk: usize,
        (oy, ox, p): (usize, usize, usize),
        buf: &[f32; TILE],
        yd: &Disjoint<f32>,
    ) {
        let plane = t.oh * t.ow;
        let ocb = t.isa.block_width(t.m);
        let p = p.min(LANES);
        let mask = ((1u32 << p) - 1) as u16;
        for half in 0..ocb / LANES {
            let mut rows = [_mm512_setzero_ps(); 16];
            for (j, r) in rows.iter_mut().take(p).enumerate() {
                *r = _mm512_loadu_ps(buf[j * ocb + half * LANES..][..LANES].as_ptr());
            }
            for (o, &col) in transpose16(rows).iter().enumerate() {
                let oc = blk * ocb + half * LANES + o;
                if oc >= t.m {
                    return;
                }
                let at = oc * plane + oy * t.ow + ox;
                // SAFETY: this task alone writes these rows of block `blk`'s channels.
                let out = unsafe { yd.part(at, p) };
                let mut v = col;
                if let Some(b) = t.bias {
                    v = _mm512_add_ps(v, _mm512_set1_ps(b[oc]));
                }
                if let Some(z) = t.z {
                    let zr = &z[at..at + p];
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, zr.as_ptr()));
                }
                v = t.act.apply512(v);
                _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, v);
            }
        }
    }

    /// [`store`] for a channels-last output: each pixel's 16 channels one masked store, no
    /// transpose. (A function of its own: a branch inside `store` made the planes' stores
    /// 10 % slower on small images, its code laid out differently.)
    ///
    /// # Safety
    /// As [`store`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store_nhwc(
        t: &Tiles<'_>,
        blk: usize,
        (oy, ox, p): (usize, usize, usize),
        buf: &[f32; TILE],
        yd: &Disjoint<f32>,
    ) {
        let ocb = t.isa.block_width(t.m);
        let p = p.min(LANES);
        // Pixel j's channels lie together: each 16 of them one masked store.
        for half in 0..ocb / LANES {
            let oc = blk * ocb + half * LANES;
            if oc >= t.m {
                return;
            }
            let lanes = (t.m - oc).min(LANES);
            let mask = ((1u32 << lanes) - 1) as u16;
            // As the planes' stores: the bias added only when there is one.
            let bias = t
                .bias
                .map(|b| _mm512_maskz_loadu_ps(mask, b[oc..oc + lanes].as_ptr()));
            for j in 0..p {
                let at = (oy * t.ow + ox + j) * t.m + oc;
                let from = j * ocb + half * LANES;
                let mut v = _mm512_loadu_ps(buf[from..from + LANES].as_ptr());
                if let Some(b) = bias {
                    v = _mm512_add_ps(v, b);
                }
                if let Some(z) = t.z {
                    let zr = &z[at..at + lanes];
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, zr.as_ptr()));
                }
                v = t.act.apply512(v);
                // SAFETY: this task alone writes these pixels of block `blk`'s channels.
                let out = unsafe { yd.part(at, lanes) };
                _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, v);
            }
        }
    }

    /// The sums over input channels `ic..ic + n` (within one block of the copy) of `p`
    /// (1..=[`super::MAX_PIX`]) pixels whose first tap's channel `ic` is at `start` (stepping
    /// by `pix_step`, the block's channels consecutive) x the block's `ocb`
    /// ([`super::Isa::block_width`]) channels (weights `w`), over kernel rows `ky.0..ky.1`, added
    /// to `buf[pixel * ocb + channel]` (which they start when `ic` is 0).
    ///
    /// # Safety
    /// The CPU has AVX-512 F; every tap of every pixel lies inside the copy; `w` holds the
    /// block's `taps * c * ocb` weights; `ic + n <= c`; `p * ocb <= TILE`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        t: &Tiles<'_>,
        start: *const f32,
        (p, ky): (usize, (usize, usize)),
        w: &[f32],
        chans: (usize, usize),
        buf: &mut [f32; TILE],
    ) {
        // The pixel steps of a block of 16 channels at strides 1 and 2, and of a 3-channel
        // image at stride 2 (the first layer of MobileNets and EfficientNets), as constants.
        macro_rules! by_width {
            ($v:literal: $($n:literal)*) => {
                match (t.pix_step, p) {
                    $((16, $n) => sums::<$n, $v, 16>(t, start, ky, w, chans, buf),)*
                    $((32, $n) => sums::<$n, $v, 32>(t, start, ky, w, chans, buf),)*
                    $((6, $n) => sums::<$n, $v, 6>(t, start, ky, w, chans, buf),)*
                    $((_, $n) => sums::<$n, $v, 0>(t, start, ky, w, chans, buf),)*
                    _ => {}
                }
            };
        }
        if t.isa.block_width(t.m) == LANES {
            by_width!(1: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
        } else {
            by_width!(2: 1 2 3 4 5 6 7 8 9 10 11 12 13 14);
        }
    }

    /// [`tile`] for exactly `P` pixels and `V` registers of channels, pixels `S` floats apart
    /// (0: `t.pix_step`): the loop whose sums stay in registers.
    #[target_feature(enable = "avx512f")]
    unsafe fn sums<const P: usize, const V: usize, const S: usize>(
        t: &Tiles<'_>,
        start: *const f32,
        ky: (usize, usize),
        w: &[f32],
        (ic0, n): (usize, usize),
        buf: &mut [f32; TILE],
    ) {
        let step = if S > 0 { S } else { t.pix_step };
        let ocb = V * LANES;
        let mut acc = [[_mm512_setzero_ps(); V]; P];
        if ic0 > 0 {
            for (j, a) in acc.iter_mut().enumerate() {
                for (r, v) in a.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(buf.as_ptr().add(j * ocb + r * LANES));
                }
            }
        }
        // The next block of input channels' weights follow this block's (see `pack`): asked
        // for into L2 while this block's are used, a block's length ahead. From memory (a
        // 512-channel layer's 9.4 MB, read once per layer), each block's first pass
        // otherwise waited on them: the prefetchers restart at every block.
        let ahead = t.taps.len() * t.cb * ocb;
        // Kernel rows `ky` only: their taps `ky.0 * kw..ky.1 * kw` (tap-major, see `pack`).
        let kw = t.taps.len() / t.vertical.kh.max(1);
        let k0 = (ky.0 * kw).min(t.taps.len());
        let taps = t
            .taps
            .get(k0..(ky.1 * kw).min(t.taps.len()))
            .unwrap_or_default();
        for (k, &tap) in (k0..).zip(taps) {
            let mut q = start.add(tap);
            let mut wp = w
                .as_ptr()
                .add(super::weight_at((t.c, t.cb, t.taps.len()), k, ic0) * ocb);
            for _ in 0..n {
                let mut wv = [_mm512_setzero_ps(); V];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(wp.add(r * LANES));
                    // A hint (never faults): the address may lie past the weights.
                    _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(ahead + r * LANES).cast());
                }
                wp = wp.add(ocb);
                for (j, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*q.add(j * step));
                    for (ar, &wr) in a.iter_mut().zip(&wv) {
                        *ar = _mm512_fmadd_ps(xv, wr, *ar);
                    }
                }
                q = q.add(1);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            for (r, &v) in a.iter().enumerate() {
                _mm512_storeu_ps(buf.as_mut_ptr().add(j * ocb + r * LANES), v);
            }
        }
    }
}

/// The AVX2 tiles: [`x86`]'s loops at half the width, 8 lanes and 16 registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::channels_last::x86::{store_first, transpose8};
    use super::{Tiles, LANES2, TILE};
    use crate::nn::Disjoint;
    use std::arch::x86_64::*;

    /// Lanes `0..n` (at most 8) of a mask for `maskload`/`maskstore`.
    #[target_feature(enable = "avx2,fma")]
    fn first_lanes(n: usize) -> __m256i {
        let n = n.min(LANES2) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// Pixels `ox..ox + p` of row `oy` from `buf` (`[pixel][channel]`) into block `blk`'s
    /// output channels of `yd`, turned 8x8 in registers, with the bias, the fused sum and the
    /// activation.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `p * ocb <= TILE`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn store(
        t: &Tiles<'_>,
        blk: usize,
        (oy, ox, p): (usize, usize, usize),
        buf: &[f32; TILE],
        yd: &Disjoint<f32>,
    ) {
        let plane = t.oh * t.ow;
        let ocb = t.isa.block_width(t.m);
        for half in 0..ocb / LANES2 {
            for j0 in (0..p).step_by(LANES2) {
                let pn = (p - j0).min(LANES2);
                let mask = first_lanes(pn);
                let mut rows = [_mm256_setzero_ps(); LANES2];
                for (j, r) in rows.iter_mut().take(pn).enumerate() {
                    let from = (j0 + j) * ocb + half * LANES2;
                    *r = _mm256_loadu_ps(buf[from..from + LANES2].as_ptr());
                }
                for (o, &col) in transpose8(rows).iter().enumerate() {
                    let oc = blk * ocb + half * LANES2 + o;
                    if oc >= t.m {
                        break;
                    }
                    let at = oc * plane + oy * t.ow + ox + j0;
                    // SAFETY: this task alone writes these rows of block `blk`'s channels.
                    let out = unsafe { yd.part(at, pn) };
                    let mut v = col;
                    if let Some(b) = t.bias {
                        v = _mm256_add_ps(v, _mm256_set1_ps(b[oc]));
                    }
                    if let Some(z) = t.z {
                        let zr = &z[at..at + pn];
                        // SAFETY: the lanes read lie in `zr` (the mask's `pn`).
                        v = _mm256_add_ps(v, unsafe { _mm256_maskload_ps(zr.as_ptr(), mask) });
                    }
                    // SAFETY: the CPU has AVX2 and FMA.
                    v = unsafe { t.act.apply256(v) };
                    store_first(out, v);
                }
            }
        }
    }

    /// [`store`] for a channels-last output: each pixel's 8 channels one store.
    ///
    /// # Safety
    /// As [`store`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn store_nhwc(
        t: &Tiles<'_>,
        blk: usize,
        (oy, ox, p): (usize, usize, usize),
        buf: &[f32; TILE],
        yd: &Disjoint<f32>,
    ) {
        let ocb = t.isa.block_width(t.m);
        for half in 0..ocb / LANES2 {
            let oc = blk * ocb + half * LANES2;
            if oc >= t.m {
                return;
            }
            let lanes = (t.m - oc).min(LANES2);
            let mask = first_lanes(lanes);
            // SAFETY: the lanes read lie in the bias (the mask's `lanes`).
            let bias = t
                .bias
                .map(|b| unsafe { _mm256_maskload_ps(b[oc..oc + lanes].as_ptr(), mask) });
            for j in 0..p {
                let at = (oy * t.ow + ox + j) * t.m + oc;
                let from = j * ocb + half * LANES2;
                let mut v = _mm256_loadu_ps(buf[from..from + LANES2].as_ptr());
                if let Some(b) = bias {
                    v = _mm256_add_ps(v, b);
                }
                if let Some(z) = t.z {
                    let zr = &z[at..at + lanes];
                    // SAFETY: as the bias.
                    v = _mm256_add_ps(v, unsafe { _mm256_maskload_ps(zr.as_ptr(), mask) });
                }
                // SAFETY: this task alone writes these pixels of block `blk`'s channels; the
                // CPU has AVX2 and FMA.
                let out = unsafe { yd.part(at, lanes) };
                v = unsafe { t.act.apply256(v) };
                store_first(out, v);
            }
        }
    }

    /// [`super::x86::tile`] with AVX2: the sums over input channels `ic..ic + n` of `p`
    /// (1..=[`super::Isa::max_pixels`]) pixels x the block's channels.
    ///
    /// # Safety
    /// As [`super::x86::tile`], with AVX2 and FMA for AVX-512.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(
        t: &Tiles<'_>,
        start: *const f32,
        (p, ky): (usize, (usize, usize)),
        w: &[f32],
        chans: (usize, usize),
        buf: &mut [f32; TILE],
    ) {
        // The pixel steps of a block of 16 channels at strides 1 and 2, and of a 3-channel
        // image at stride 2 (the first layer of MobileNets and EfficientNets), as constants.
        macro_rules! by_width {
            ($v:literal: $($n:literal)*) => {
                match (t.pix_step, p) {
                    $((16, $n) => sums::<$n, $v, 16>(t, start, ky, w, chans, buf),)*
                    $((32, $n) => sums::<$n, $v, 32>(t, start, ky, w, chans, buf),)*
                    $((6, $n) => sums::<$n, $v, 6>(t, start, ky, w, chans, buf),)*
                    $((_, $n) => sums::<$n, $v, 0>(t, start, ky, w, chans, buf),)*
                    _ => {}
                }
            };
        }
        if t.isa.block_width(t.m) == LANES2 {
            by_width!(1: 1 2 3 4 5 6 7 8 9 10 11 12);
        } else {
            by_width!(2: 1 2 3 4 5 6);
        }
    }

    /// [`tile`] for exactly `P` pixels and `V` registers of channels, pixels `S` floats apart
    /// (0: `t.pix_step`): the loop whose sums stay in registers.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sums<const P: usize, const V: usize, const S: usize>(
        t: &Tiles<'_>,
        start: *const f32,
        ky: (usize, usize),
        w: &[f32],
        (ic0, n): (usize, usize),
        buf: &mut [f32; TILE],
    ) {
        let step = if S > 0 { S } else { t.pix_step };
        let ocb = V * LANES2;
        let mut acc = [[_mm256_setzero_ps(); V]; P];
        if ic0 > 0 {
            for (j, a) in acc.iter_mut().enumerate() {
                for (r, v) in a.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(buf.as_ptr().add(j * ocb + r * LANES2));
                }
            }
        }
        // The next block of input channels' weights asked for into L2 (see the AVX-512 loop).
        let ahead = t.taps.len() * t.cb * ocb;
        let kw = t.taps.len() / t.vertical.kh.max(1);
        let k0 = (ky.0 * kw).min(t.taps.len());
        let taps = t
            .taps
            .get(k0..(ky.1 * kw).min(t.taps.len()))
            .unwrap_or_default();
        for (k, &tap) in (k0..).zip(taps) {
            let mut q = start.add(tap);
            let mut wp = w
                .as_ptr()
                .add(super::weight_at((t.c, t.cb, t.taps.len()), k, ic0) * ocb);
            for _ in 0..n {
                let mut wv = [_mm256_setzero_ps(); V];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(wp.add(r * LANES2));
                }
                // One prefetch per 64-byte line of weights (a 16-channel block's two
                // registers are one line).
                _mm_prefetch::<_MM_HINT_T1>(wp.wrapping_add(ahead).cast());
                wp = wp.add(ocb);
                for (j, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*q.add(j * step));
                    for (ar, &wr) in a.iter_mut().zip(&wv) {
                        *ar = _mm256_fmadd_ps(xv, wr, *ar);
                    }
                }
                q = q.add(1);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            for (r, &v) in a.iter().enumerate() {
                _mm256_storeu_ps(buf.as_mut_ptr().add(j * ocb + r * LANES2), v);
            }
        }
    }
}
