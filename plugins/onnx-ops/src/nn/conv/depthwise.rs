//! Depthwise 2-D convolution in f32 (one input channel per output channel), computed directly
//! on the NCHW planes.
//!
//! The general path unrolls each group with im2col and calls a gemm of one output row per
//! group: for a depthwise layer that is `kh*kw` copies of the plane and a matrix product with
//! nothing to reuse, per channel (MobileNetV2's 17 depthwise layers spent most of its f32 run
//! there). Here each channel's input is first copied once into a zero-padded plane, every row
//! split into `stride` phase rows (column `stride*j + q` goes to phase `q`, position `j`), so
//! that for any padding, stride and dilation each tap of a run of outputs reads one contiguous
//! run of the copy: no edge cases in the inner loop. The outputs are then computed in runs of
//! [`LANES`] (bias, every tap, activation, one store), [`RUNS`] runs at a time so the adds of
//! independent runs overlap (one run alone waits on its own chain of `kh*kw` dependent adds;
//! the last layers of MobileNetV2 are 7 wide, so runs are taken across rows, not along one).
//! Runs past the row's end compute into the copy's zero margin and are not stored.
//!
//! That per-plane loop puts output pixels in the lanes: a 7- or 14-wide row fills half or
//! all but two of a run's 16, and each plane's copy and tap setup is paid per channel
//! (MobileNetV2's 7x7x960 layers took 0.10 ms, ONNX Runtime's NCHWc kernel 0.03). On a CPU
//! with AVX-512 or AVX2 the channels go in the lanes instead ([`run_lanes`]): each image copied
//! channels-last ([`ChannelsLast`]; a large one in bands of rows, each read while in cache),
//! 16 channels x up to 16 pixels of a row per tile, each tap one multiply-add per pixel with
//! the tap's 16 weights in one register, the tile turned back to NCHW in registers. Measured
//! on MobileNetV2's 17 depthwise layers: 2.41 -> 1.93 ms in all, the 7- and 14-wide ones
//! about twice as fast (AVX2: 4.8 -> 3.8 ms, Zen 3); the per-plane loop stays for CPUs
//! without either and for large strided images (see [`run_lanes`]).
//!
//! A channels-last x (the graph pass `nhwc-conv` lets the expanding 1x1 layer write it so) of
//! whole registers of channels is not copied at all: the tiles read it in place, those of
//! rows whose window leaves the image with their inner taps only, and the few pixels of the
//! left and right margins one by one ([`Lanes::rows_in_place`]). The copy with its zero
//! margin had cost a third as much as the taps (MobileNetV2, one thread: 8.6 -> 7.7 ms).

use super::channels_last::ChannelsLast;
use super::direct::Isa;
use super::{nhwc::transposed, Activation, Layouts};
use crate::nn::{Disjoint, Geometry};
use crate::util::TaskScratch;
use opreg_sdk::alloc::{checked_numel, try_vec};
use opreg_sdk::prelude::*;

/// Whether the convolution of `x` (shape `xs`) with `group` groups and `m` output channels is
/// one this module computes: 2-D, one input and one output channel per group.
pub(super) fn applies(xs: &[usize], group: usize, m: usize) -> bool {
    xs.len() == 4 && group > 1 && xs[1] == group && m == group
}

#[cfg(test)]
thread_local! {
    /// Set by tests to run the per-plane loop where the channels-last one would be taken.
    pub(super) static PLANES_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The depthwise convolution into `y` (`n x c x oh x ow`, or `n x oh x ow x c` when
/// `layouts.y_nhwc`), with `bias` and `act` applied; `xs` is x's NCHW shape whatever its
/// layout. Channels in the lanes ([`run_lanes`]) on a CPU with AVX-512 or AVX2 ([`Isa`]),
/// else (and for a large strided NCHW image) each channel's plane on its own.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    ctx: &KernelContext<'_>,
    xs: &[usize],
    g: &Geometry,
    (x, w, packed): (&[f32], &[f32], Option<&[f32]>),
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
    layouts: Layouts,
) -> Result<(), PluginError> {
    #[cfg(test)]
    let planes_only = PLANES_ONLY.with(|f| f.get());
    #[cfg(not(test))]
    let planes_only = false;
    if !planes_only
        && Isa::detect().is_some()
        && run_lanes(ctx, xs, g, (x, w, packed), bias, act, y, layouts)?
    {
        return Ok(());
    }
    if !layouts.nchw() {
        // The per-plane loop reads and writes NCHW: channels-last operands are turned
        // around it (a CPU without AVX-512 or AVX2, or a copy that would be much larger
        // than x).
        let (n, c) = (xs[0], xs[1]);
        let (pin, pout) = (xs[2] * xs[3], g.out[0] * g.out[1]);
        let nchw_x;
        let x = if layouts.x_nhwc {
            nchw_x = transposed(x, n, (pin, c))?;
            &nchw_x[..]
        } else {
            x
        };
        if !layouts.y_nhwc {
            return run(ctx, xs, g, (x, w, None), bias, act, y, Layouts::default());
        }
        let mut tmp = try_vec(y.len(), 0.0f32)?;
        run(
            ctx,
            xs,
            g,
            (x, w, None),
            bias,
            act,
            &mut tmp,
            Layouts::default(),
        )?;
        let back = transposed(&tmp, n, (c, pout))?;
        y.copy_from_slice(&back);
        return Ok(());
    }
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
    // Rows of 16 outputs or more in runs of 16 (AVX-512); narrower ones (MobileNetV2's
    // 14- and 7-wide layers) in runs of 8, which waste fewer lanes past the row's end.
    let lanes = if ow >= WIDE_LANES && crate::simd::has_avx512() {
        WIDE_LANES
    } else {
        LANES
    };
    let pad = Padded::new(g, (oh, ow), lanes)?;
    let yd = Disjoint::new(y);
    ctx.parallel_for(y_planes, planes, |range| {
        // `fill` writes every element of the copy: reused scratch, no zeroed allocation.
        let copy = ctx.scratch_reused::<f32>(pad.len)?;
        let mut offsets = Vec::new();
        let mut weights = Vec::new();
        for plane in range {
            // SAFETY: each plane is written by the one task whose range holds it.
            let out = unsafe { yd.part(plane * plane_out, plane_out) };
            let ch = plane % c;
            let xp = &x[plane * plane_in..(plane + 1) * plane_in];
            pad.fill(xp, (ih, iw), copy);
            pad.taps(&w[ch * taps..(ch + 1) * taps], &mut offsets, &mut weights);
            let b = bias.map_or(0.0, |b| b[ch]);
            channel(copy, &pad, &offsets, &weights, b, act, out);
        }
        Ok(())
    })
}

/// `W` (`c x taps`, one input channel per group) as one row of `stride` channels per tap
/// (`stride`: c rounded up to whole registers, zero past c): what [`run_lanes`] reads.
pub(super) fn pack(w: &[f32], c: usize, taps: usize) -> Result<Vec<f32>, PluginError> {
    let stride = c.div_ceil(WIDE_LANES) * WIDE_LANES;
    let mut wt = try_vec(checked_numel(&[taps, stride])?, 0.0f32)?;
    for (ch, wc) in w.chunks_exact(taps.max(1)).take(c).enumerate() {
        for (t, &v) in wc.iter().enumerate() {
            wt[t * stride + ch] = v;
        }
    }
    Ok(wt)
}

/// The depthwise convolution with the channels in the lanes (AVX-512 or AVX2): each image copied
/// channels-last ([`ChannelsLast`]; a plain copy with its margins when x is channels-last
/// already), 16 channels x up to 16 pixels of a row per tile, turned back to NCHW in
/// registers (stored as they are for a channels-last y). `Ok(false)` (nothing written) where
/// the copy would be much larger than x.
#[allow(clippy::too_many_arguments)]
fn run_lanes(
    ctx: &KernelContext<'_>,
    xs: &[usize],
    g: &Geometry,
    (x, w, packed): (&[f32], &[f32], Option<&[f32]>),
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
    layouts: Layouts,
) -> Result<bool, PluginError> {
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
    if y.is_empty() || plane == 0 {
        return Ok(true);
    }
    let stride = c.div_ceil(WIDE_LANES) * WIDE_LANES;
    let Some(mut cp) = ChannelsLast::new(g, (c, ih, iw), stride) else {
        return Ok(false);
    };
    cp.nhwc = layouts.x_nhwc;
    let image = checked_numel(&[c, ih, iw])?;
    let taps = checked_numel(&[kh, kw])?;
    if x.len() < checked_numel(&[n, image])?
        || w.len() < checked_numel(&[c, taps])?
        || y.len() < n * c * plane
        || bias.is_some_and(|b| b.len() < c)
    {
        return Err(PluginError::invalid(
            "Conv: X, W or B is shorter than its shape",
        ));
    }
    // Weights per tap as rows of `stride` channels (regrouped at load for constant weights),
    // the bias as one such row (zero past c).
    let built;
    let wt = match packed {
        Some(p) if p.len() == checked_numel(&[taps, stride])? => p,
        _ => {
            built = pack(w, c, taps)?;
            &built[..]
        }
    };
    let mut bv = try_vec(stride, 0.0f32)?;
    if let Some(b) = bias {
        bv[..c].copy_from_slice(&b[..c]);
    }
    // A channels-last x of whole blocks of 16 channels (then `stride == c`) is read where it
    // lies; else from the padded copy. Only the pitch of a row differs.
    let in_place = layouts.x_nhwc && c.is_multiple_of(WIDE_LANES);
    let cols = if in_place { iw } else { cp.cols };
    let mut offsets = try_vec(taps, 0usize)?;
    for ky in 0..kh {
        for kx in 0..kw {
            offsets[ky * kw + kx] = (ky * dh * cols + kx * dw) * stride;
        }
    }
    let lanes = Lanes {
        offsets: &offsets,
        wt,
        bv: &bv,
        c,
        stride,
        oh,
        ow,
        row_step: sh * cols * stride,
        pix_step: sw * stride,
        act,
        y_nhwc: layouts.y_nhwc,
        isa,
        prefetch: x.len().saturating_mul(4) >= PREFETCH_FROM,
    };
    // Output rows per task when one image is spread over the threads: about 16k multiply-adds,
    // but never the whole image on one thread (a 7x7x576 layer's 7 rows were one task: its
    // multiply-adds are a fifth of its time, the rest reading the input), and evenly: 14
    // rows in 5, 5 and 4 kept one thread on 10 of them.
    let per_row = (stride / WIDE_LANES) * ow * taps;
    let most = oh.div_ceil(ctx.num_threads().max(1));
    let grain = ctx.even_grain(oh, (16384 / per_row.max(1)).clamp(1, most));
    if in_place {
        let at = InPlace {
            ih,
            iw,
            pt: g.pad_begin[0],
            pl: g.pad_begin[1],
            sh,
            sw,
            dh,
            dw,
            kh,
            kw,
        };
        let yd = Disjoint::new(y);
        if n >= ctx.num_threads().max(2) {
            // One task per image, as below.
            return ctx
                .parallel_for(n, 1, |range| {
                    for b in range {
                        // SAFETY: each image's output is written by the one task holding it.
                        let yb = Disjoint::new(unsafe { yd.part(b * c * plane, c * plane) });
                        lanes.rows_in_place(&at, &x[b * image..(b + 1) * image], 0..oh, &yb)?;
                    }
                    Ok(())
                })
                .map(|()| true);
        }
        for b in 0..n {
            let xb = &x[b * image..(b + 1) * image];
            // SAFETY: each image's output is a disjoint part of y, written one after another.
            let yb = Disjoint::new(unsafe { yd.part(b * c * plane, c * plane) });
            ctx.parallel_for(oh, grain, |range| lanes.rows_in_place(&at, xb, range, &yb))?;
        }
        return Ok(true);
    }
    let row_len = cp.row_len();
    // Padded rows that output rows `r0..r0 + rows` read.
    let band_rows = |rows: usize| (rows - 1) * sh + (kh - 1) * dh + 1;
    // A large image (MobileNetV2's 112x112 layers: 1.6-4.8 MB channels-last) is copied in
    // bands of output rows, each read while in cache (measured: one whole copy, written out
    // to memory and read back, made the 112x112 layers slower than the per-plane loop).
    // Strided, a band fills more than twice the rows it serves: past the L2 caches the
    // per-plane loop measured faster (MobileNetV2's 112x112x96 stride-2 layer, 4.9 MB
    // channels-last: 0.44 against 0.35 ms; 512 KB bands were slower still), below them
    // slower (its 56x56x144 one: 0.11 against 0.16 ms). A channels-last x has no transpose
    // to pay: its bands are plain copies.
    if (sh > 1 || sw > 1) && cp.len > 16 * BAND_FLOATS && !layouts.x_nhwc {
        return Ok(false);
    }
    // Output rows per band: as many as fit BAND_FLOATS (a small image: all).
    let mut most = 1;
    while most < oh && band_rows(most + 1) * row_len <= BAND_FLOATS {
        most += 1;
    }
    // Copies output rows `rows`' band of image `xb` into `copy` and computes them.
    let band = |copy: &mut [f32], xb: &[f32], rows: std::ops::Range<usize>, yd: &Disjoint<f32>| {
        let first = rows.start * sh;
        let filled = band_rows(rows.len()) * row_len;
        for (i, chunk) in copy[..filled].chunks_mut(row_len).enumerate() {
            cp.fill(xb, first + i, chunk);
        }
        lanes.rows(&copy[..filled], rows.start, rows, yd)
    };
    if n >= ctx.num_threads().max(2) {
        // Enough images to keep every thread busy: one task per image, band after band,
        // instead of parallel passes per image that wait on the threads' hand-offs.
        let band_len = checked_numel(&[band_rows(most), row_len])?;
        return super::per_image_tasks(ctx, n, (y, c * plane), band_len, |copy, b, yb| {
            let xb = &x[b * image..(b + 1) * image];
            for k in 0..oh.div_ceil(most) {
                band(copy, xb, k * most..((k + 1) * most).min(oh), yb)?;
            }
            Ok(())
        });
    }
    if cp.len <= BAND_FLOATS {
        // A small image: copied once, then every task reads the shared copy (in cache).
        let copy = ctx.scratch_reused::<f32>(cp.len)?;
        for b in 0..n {
            let xb = &x[b * image..(b + 1) * image];
            ctx.parallel_chunks(copy, row_len, |start, chunk| {
                cp.fill(xb, start / row_len, chunk);
            })?;
            let yd = Disjoint::new(&mut y[b * c * plane..(b + 1) * c * plane]);
            let copy = &*copy;
            ctx.parallel_for(oh, grain, |range| lanes.rows(copy, 0, range, &yd))?;
        }
        return Ok(true);
    }
    // A large image: its bands spread over the threads.
    let most = most.min(oh.div_ceil(2 * ctx.num_threads().max(1)).max(1));
    let band_len = checked_numel(&[band_rows(most), row_len])?;
    let copies = TaskScratch::<f32>::new(ctx, band_len);
    for b in 0..n {
        let xb = &x[b * image..(b + 1) * image];
        let yd = Disjoint::new(&mut y[b * c * plane..(b + 1) * c * plane]);
        ctx.parallel_for(oh.div_ceil(most), 1, |range| {
            let mut copy = copies.take()?;
            let copy = &mut copy[..];
            for k in range {
                band(copy, xb, k * most..((k + 1) * most).min(oh), &yd)?;
            }
            Ok(())
        })?;
    }
    Ok(true)
}

/// Floats of channels-last copy up to which an image is copied whole (256 KB), and at most
/// in one band of a larger one.
const BAND_FLOATS: usize = 1 << 16;

/// What computing the channels-last tiles of one image needs.
#[derive(Clone, Copy)]
struct Lanes<'a> {
    offsets: &'a [usize],
    wt: &'a [f32],
    bv: &'a [f32],
    c: usize,
    stride: usize,
    oh: usize,
    ow: usize,
    /// Copy elements from one output row's first tap to the next's, and from one pixel's.
    row_step: usize,
    pix_step: usize,
    act: Activation,
    /// Whether the output is channels-last (tiles stored as they are).
    y_nhwc: bool,
    /// The vector unit of the tiles.
    isa: Isa,
    /// Whether [`rows_in_place`](Self::rows_in_place) brings the next row's input into L2
    /// (an input of at least [`PREFETCH_FROM`] bytes).
    prefetch: bool,
}

/// Bytes of input (the whole batch) from which the in-place rows prefetch the rows they read
/// next: past the caches (MobileNetV2's 56x56x144 layer at batch 8, 14.4 MB) the prefetch
/// took batch 8 from 39.0 to 38.2 ms. A smaller input is in L2 already, where the hints
/// (a stride-2 14x14x576 layer: a thousand per output row of 2268 multiply-adds) cost its
/// batch-1 layer a third of its time.
const PREFETCH_FROM: usize = 4 << 20;

impl Lanes<'_> {
    /// Output rows `rows` of every channel into `yd` (the image's output), from `copy`: the
    /// channels-last copy from the padded row that output row `first_row` reads first on.
    fn rows(
        &self,
        copy: &[f32],
        first_row: usize,
        rows: std::ops::Range<usize>,
        yd: &Disjoint<f32>,
    ) -> Result<(), PluginError> {
        // Every read lies inside the copy: the last pixel's last tap of the last channel
        // block is the copy's last element by construction; checked once here for the
        // unchecked loads.
        if rows.start < first_row || rows.end > self.oh || rows.is_empty() {
            return Ok(());
        }
        let last = (rows.end - 1 - first_row) * self.row_step
            + (self.ow - 1) * self.pix_step
            + self.offsets.last().copied().unwrap_or(0)
            + self.stride;
        if copy.len() < last
            || self.wt.len() < self.offsets.len() * self.stride
            || self.bv.len() < self.stride
            || rows.end > self.oh
        {
            return Err(PluginError::internal(
                "Conv: the channels-last copy is shorter than the depthwise tiles read",
            ));
        }
        for oy in rows {
            for cb in (0..self.c).step_by(WIDE_LANES) {
                for ox in (0..self.ow).step_by(WIDE_LANES) {
                    let p = (self.ow - ox).min(WIDE_LANES);
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `run_lanes` runs only on a CPU with `isa`; the reads lie
                    // before `last` (checked above), the stores in bounds-checked parts of y.
                    unsafe {
                        let base = copy
                            .as_ptr()
                            .add((oy - first_row) * self.row_step + ox * self.pix_step + cb);
                        match self.isa {
                            Isa::Avx512 => x86::lanes_tile(self, base, (oy, ox, p), cb, yd),
                            Isa::Avx2 => avx2::lanes_tile(self, base, (oy, ox, p), cb, yd),
                        }
                    };
                }
            }
        }
        Ok(())
    }
}

/// The window over a channels-last image read in place (see [`Lanes::rows_in_place`]).
struct InPlace {
    ih: usize,
    iw: usize,
    /// Leading pads.
    pt: usize,
    pl: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    kh: usize,
    kw: usize,
}

impl InPlace {
    /// The tap rows of output row `oy` that lie in the image, `ky0..ky1` (possibly empty),
    /// and the input row of the first. (The window's extents are bounded by
    /// [`ChannelsLast::new`]: no product overflows.)
    fn tap_rows(&self, oy: usize) -> (usize, usize, usize) {
        let top = oy * self.sh;
        // Tap ky reads input row top + ky * dh - pt.
        let ky0 = self.pt.saturating_sub(top).div_ceil(self.dh).min(self.kh);
        let ky1 = (self.ih + self.pt)
            .checked_sub(top)
            .map_or(0, |room| room.div_ceil(self.dh).min(self.kh));
        let ky1 = ky1.max(ky0);
        (ky0, ky1, (top + ky0 * self.dh).saturating_sub(self.pt))
    }

    /// The tap columns of output column `ox` that lie in the image, `kx0..kx1` (possibly
    /// empty), and the input column of the first (as [`tap_rows`](Self::tap_rows)).
    fn tap_cols(&self, ox: usize) -> (usize, usize, usize) {
        let left = ox * self.sw;
        let kx0 = self.pl.saturating_sub(left).div_ceil(self.dw).min(self.kw);
        let kx1 = (self.iw + self.pl)
            .checked_sub(left)
            .map_or(0, |room| room.div_ceil(self.dw).min(self.kw))
            .max(kx0);
        (kx0, kx1, (left + kx0 * self.dw).saturating_sub(self.pl))
    }

    /// The pixel of x that the last tap inside the image reads, for the (non-empty) tap rows
    /// and columns of [`tap_rows`](Self::tap_rows) and [`tap_cols`](Self::tap_cols).
    fn last_tap(
        &self,
        (ky0, ky1, iy0): (usize, usize, usize),
        (kx0, kx1, ix0): (usize, usize, usize),
    ) -> usize {
        (iy0 + (ky1 - 1 - ky0) * self.dh) * self.iw + ix0 + (kx1 - 1 - kx0) * self.dw
    }

    /// The output columns all of whose taps lie in the image: `lo..hi` (`lo == hi`: none).
    fn inner_cols(&self, ow: usize) -> (usize, usize) {
        let lo = self.pl.div_ceil(self.sw).min(ow);
        // Column ox is inside when ox * sw - pl + (kw - 1) * dw <= iw - 1.
        let hi = (self.iw + self.pl)
            .checked_sub((self.kw - 1) * self.dw + 1)
            .map_or(0, |last| (last / self.sw + 1).min(ow));
        (lo, hi.max(lo))
    }
}

impl Lanes<'_> {
    /// Output rows `rows` of every channel into `yd` (the image's output) from `xb`, the
    /// channels-last image itself (`c` a whole number of registers; `offsets`, `row_step` and
    /// `pix_step` in its elements): the pixels all of whose taps lie in the image in tiles as
    /// [`rows`](Self::rows) computes them, the others (the padded margin) one by one, their
    /// taps outside the image skipped (a zero-padded copy adds `w * 0`, which changes no bit
    /// of a finite sum).
    ///
    /// Why: the copy with its zero margin cost as much as a third of the taps on MobileNetV2's
    /// depthwise layers, whose input the expanding 1x1 layer writes channels-last.
    fn rows_in_place(
        &self,
        at: &InPlace,
        xb: &[f32],
        rows: std::ops::Range<usize>,
        yd: &Disjoint<f32>,
    ) -> Result<(), PluginError> {
        let c = self.c;
        if !c.is_multiple_of(WIDE_LANES)
            || xb.len() < at.ih * at.iw * c
            || self.wt.len() < self.offsets.len() * self.stride
            || self.bv.len() < self.stride
            || self.offsets.len() != at.kh * at.kw
            || rows.end > self.oh
        {
            return Err(PluginError::internal(
                "Conv: the depthwise operands do not match the in-place window",
            ));
        }
        let (lo, hi) = at.inner_cols(self.ow);
        for oy in rows {
            // The rows the next output row reads first, brought into L2 while this one's
            // tiles run: at batch 8 the x a depthwise layer reads (MobileNetV2's 56x56x144,
            // 14.4 MB) has left the caches since the layer before wrote it, and a tile's reads
            // step a whole pixel (c floats) per lane group, a stride the hardware prefetchers
            // follow late. Measured on MobileNetV2, batch 8, 2 threads: 39.0 -> 38.2 ms over
            // three alternations; batch 1 (x still in cache) unchanged.
            #[cfg(target_arch = "x86_64")]
            if self.prefetch {
                let first = (oy * at.sh + (at.kh - 1) * at.dh + 1).saturating_sub(at.pt);
                let last = ((oy + 1) * at.sh + (at.kh - 1) * at.dh + 1).saturating_sub(at.pt);
                // Saturating: a hint needs no exact range (`prefetch_l2` skips one past x).
                let row_floats = at.iw.saturating_mul(c);
                let rows =
                    first.saturating_mul(row_floats)..last.min(at.ih).saturating_mul(row_floats);
                x86::prefetch_l2(xb, rows);
            }
            // The tap rows inside the image are consecutive taps: the inner pixels of a row
            // whose window leaves the image at the top or bottom (a padded first or last
            // row) are tiles too, of those taps only.
            let (ky0, ky1, iy0) = at.tap_rows(oy);
            let taps = (ky1 - ky0) * at.kw;
            let row = Lanes {
                offsets: &self.offsets[..taps],
                wt: &self.wt[ky0 * at.kw * self.stride..],
                ..*self
            };
            let base = iy0 * at.iw * c + (lo * at.sw).saturating_sub(at.pl) * c;
            let tiles = taps > 0 && lo < hi;
            // Every tile read lies before the last inner pixel's last tap (checked once per
            // row for the unchecked loads).
            if tiles && base + (hi - 1 - lo) * self.pix_step + row.offsets[taps - 1] + c > xb.len()
            {
                return Err(PluginError::internal(
                    "Conv: a depthwise tile would read past the image",
                ));
            }
            let edges = if tiles {
                [0..lo, hi..self.ow]
            } else {
                [0..self.ow, 0..0]
            };
            #[cfg(target_arch = "x86_64")]
            for cb in (0..c).step_by(WIDE_LANES * x86::EDGE_BLOCKS) {
                for ox in edges.clone().into_iter().flatten() {
                    let pixel = (oy, ox);
                    let taps = (ky0, ky1, iy0);
                    // SAFETY: `run_lanes` runs only on a CPU with `isa`; c is a multiple of
                    // 16 (checked above); the reads are checked.
                    let stored = unsafe {
                        match self.isa {
                            Isa::Avx512 => x86::edge_pixel(self, at, xb, pixel, taps, cb, yd),
                            Isa::Avx2 => avx2::edge_pixel(self, at, xb, pixel, taps, cb, yd),
                        }
                    };
                    if !stored {
                        return Err(PluginError::internal(
                            "Conv: a depthwise edge pixel would read past the image",
                        ));
                    }
                }
            }
            if !tiles {
                continue;
            }
            for cb in (0..c).step_by(WIDE_LANES) {
                let mut ox = lo;
                while ox < hi {
                    let p = (hi - ox).min(WIDE_LANES);
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `run_lanes` runs only on a CPU with `isa`; the reads lie before
                    // the row's last (checked above), the stores in bounds-checked parts of y.
                    unsafe {
                        let at = xb.as_ptr().add(base + (ox - lo) * self.pix_step + cb);
                        match self.isa {
                            Isa::Avx512 => x86::lanes_tile(&row, at, (oy, ox, p), cb, yd),
                            Isa::Avx2 => avx2::lanes_tile(&row, at, (oy, ox, p), cb, yd),
                        }
                    };
                    ox += p;
                }
            }
        }
        Ok(())
    }
}

/// Outputs computed together along a row (AVX2 and portable loops).
const LANES: usize = 8;
/// Outputs computed together along a row by the AVX-512 loop.
const WIDE_LANES: usize = 16;

/// Whether this CPU has AVX-512 (F, BW, VL).
/// Runs of [`LANES`] outputs computed together.
const RUNS: usize = 8;

/// The geometry of one channel's zero-padded, phase-split copy (see the module docs).
pub(super) struct Padded {
    /// Output extents.
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// Strides, dilations, kernel and leading pads.
    pub(super) sh: usize,
    pub(super) sw: usize,
    pub(super) dh: usize,
    pub(super) dw: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) ph: usize,
    pub(super) pw: usize,
    /// Padded rows the outputs read.
    pub(super) rows: usize,
    /// Length of one phase row.
    pub(super) phase_len: usize,
    /// Floats in the copy.
    pub(super) len: usize,
    /// Outputs per run ([`LANES`], or [`WIDE_LANES`] for the AVX-512 loop).
    pub(super) lanes: usize,
}

impl Padded {
    /// The copy for outputs `oh x ow`, read in runs of `lanes` outputs (each phase row is
    /// long enough for a whole last run).
    pub(super) fn new(
        g: &Geometry,
        (oh, ow): (usize, usize),
        lanes: usize,
    ) -> Result<Padded, PluginError> {
        let too_large = || PluginError::invalid("Conv: depthwise geometry overflows");
        let (sh, sw) = (g.strides[0].max(1), g.strides[1].max(1));
        let (dh, dw) = (g.dilations[0], g.dilations[1]);
        let (kh, kw) = (g.kernel[0], g.kernel[1]);
        let ow_runs = ow
            .div_ceil(lanes)
            .checked_mul(lanes)
            .ok_or_else(too_large)?;
        // Row oy*sh + ky*dh; phase position ox + (kx*dw)/sw.
        let rows = (oh.saturating_sub(1))
            .checked_mul(sh)
            .and_then(|r| r.checked_add(kh.saturating_sub(1).checked_mul(dh)?))
            .and_then(|r| r.checked_add(1))
            .ok_or_else(too_large)?;
        let phase_len = kw
            .saturating_sub(1)
            .checked_mul(dw)
            .map(|t| t / sw + 1)
            .and_then(|t| t.checked_add(ow_runs))
            .ok_or_else(too_large)?;
        let len = rows
            .checked_mul(sw)
            .and_then(|r| r.checked_mul(phase_len))
            .ok_or_else(too_large)?;
        Ok(Padded {
            oh,
            ow,
            sh,
            sw,
            dh,
            dw,
            kh,
            kw,
            ph: g.pad_begin[0],
            pw: g.pad_begin[1],
            rows,
            phase_len,
            len,
            lanes,
        })
    }

    /// Copies the plane `xp` (`ih x iw`) into `copy`: padded row `r` is input row `r - ph`,
    /// padded column `sw*j + q` (phase `q`, position `j`) input column `sw*j + q - pw`, and
    /// every other position is zero (so `copy` may hold anything before).
    pub(super) fn fill(&self, xp: &[f32], (ih, iw): (usize, usize), copy: &mut [f32]) {
        let row_len = self.sw * self.phase_len;
        for (r, dst) in copy.chunks_exact_mut(row_len).take(self.rows).enumerate() {
            let Some(iy) = r.checked_sub(self.ph).filter(|&iy| iy < ih) else {
                dst.fill(0.0);
                continue;
            };
            let src = &xp[iy * iw..(iy + 1) * iw];
            for (q, phase) in dst.chunks_exact_mut(self.phase_len).enumerate() {
                // Positions j whose column sw*j + q - pw lies in 0..iw.
                let lo = self
                    .pw
                    .saturating_sub(q)
                    .div_ceil(self.sw)
                    .min(self.phase_len);
                let hi = (iw + self.pw)
                    .saturating_sub(q)
                    .div_ceil(self.sw)
                    .clamp(lo, self.phase_len);
                let first = self.sw * lo + q - self.pw;
                phase[..lo].fill(0.0);
                phase[hi..].fill(0.0);
                if self.sw == 1 {
                    phase[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                } else {
                    every(&src[first..], self.sw, &mut phase[lo..hi]);
                }
            }
        }
    }

    /// Each tap's offset in the copy (from a run's first output) and weight.
    fn taps(&self, wk: &[f32], offsets: &mut Vec<usize>, weights: &mut Vec<f32>) {
        offsets.clear();
        weights.clear();
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                offsets.push(self.offset(ky, kx));
                weights.push(wk[ky * self.kw + kx]);
            }
        }
    }

    /// Tap `(ky, kx)`'s offset in the copy from a run's first output.
    pub(super) fn offset(&self, ky: usize, kx: usize) -> usize {
        let t = kx * self.dw;
        (ky * self.dh * self.sw + t % self.sw) * self.phase_len + t / self.sw
    }
}

crate::simd::simd_fn! {
    /// `dst[j] = src[step * j]`: one phase of a strided row. Stride 2 (the common one) as
    /// pairs, which vectorizes into shuffles; a step taken at run time does not (measured:
    /// the stride-2 copies were as slow as the depthwise taps themselves).
    fn every(src: &[f32], step: usize, dst: &mut [f32]) {
        let Some((last, head)) = dst.split_last_mut() else {
            return;
        };
        if step == 2 {
            for (d, pair) in head.iter_mut().zip(src.chunks_exact(2)) {
                *d = pair[0];
            }
            *last = src.get(2 * head.len()).copied().unwrap_or(0.0);
            return;
        }
        for (d, &v) in dst.iter_mut().zip(src.iter().step_by(step)) {
            *d = v;
        }
    }
}

/// The runs of `pad.lanes` outputs, row by row: where each starts in the copy and in `out`, and
/// how many outputs it stores. Advanced by additions only (a division per run cost more than
/// the run's taps).
struct Runs<'a> {
    pad: &'a Padded,
    oy: usize,
    ox: usize,
}

impl<'a> Runs<'a> {
    fn new(pad: &'a Padded) -> Self {
        Runs { pad, oy: 0, ox: 0 }
    }
}

impl Runs<'_> {
    /// The next [`RUNS`] runs (as many as are left: the count), for the loops that keep
    /// that many in flight.
    #[inline(always)]
    fn next_group(&mut self) -> ([(usize, usize, usize); RUNS], usize) {
        let mut at = [(0usize, 0usize, 0usize); RUNS];
        let mut n = 0;
        for slot in at.iter_mut() {
            match self.next() {
                Some(r) => *slot = r,
                None => break,
            }
            n += 1;
        }
        (at, n)
    }
}

impl Iterator for Runs<'_> {
    type Item = (usize, usize, usize);

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        let pad = self.pad;
        if self.oy >= pad.oh || pad.ow == 0 {
            return None;
        }
        let ox = self.ox;
        let run = (
            self.oy * pad.sh * pad.sw * pad.phase_len + ox,
            self.oy * pad.ow + ox,
            pad.lanes.min(pad.ow - ox),
        );
        self.ox += pad.lanes;
        if self.ox >= pad.ow {
            self.ox = 0;
            self.oy += 1;
        }
        Some(run)
    }
}

/// One channel from its padded copy into `out` (`oh x ow`): bias, taps, activation.
fn channel(
    copy: &[f32],
    pad: &Padded,
    offsets: &[usize],
    weights: &[f32],
    b: f32,
    act: Activation,
    out: &mut [f32],
) {
    // Every read lies inside the copy by construction (see `Padded::new`); checked once here
    // so the vector loop can read unchecked.
    if copy.len() < pad.len || out.len() < pad.oh * pad.ow || offsets.len() != weights.len() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if pad.lanes == WIDE_LANES && crate::simd::has_avx512() {
        // SAFETY: the CPU has AVX-512 F; the lengths were checked above.
        return unsafe { x86::channel512(copy, pad, offsets, weights, b, act, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if pad.lanes == LANES
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA; the lengths were checked above.
        return unsafe { x86::channel(copy, pad, offsets, weights, b, act, out) };
    }
    let lanes = pad.lanes.min(WIDE_LANES);
    for (src, dst, len) in Runs::new(pad) {
        let mut sum = [b; WIDE_LANES];
        let sum = &mut sum[..lanes];
        for (&off, &w) in offsets.iter().zip(weights) {
            let v = &copy[src + off..src + off + lanes];
            for (s, &x) in sum.iter_mut().zip(v) {
                *s += w * x;
            }
        }
        for (o, &v) in out[dst..dst + len].iter_mut().zip(sum.iter()) {
            *o = act.apply(v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::channels_last::x86::{store_first, transpose16};
    use super::{Activation, InPlace, Lanes, Padded, Runs, RUNS, WIDE_LANES};
    use crate::nn::Disjoint;
    use std::arch::x86_64::*;

    /// Asks for the cache lines of `x[range]` in L2 (nothing where the range is empty or
    /// reversed, or leaves x): a hint, which never faults or changes a result.
    pub(super) fn prefetch_l2(x: &[f32], range: std::ops::Range<usize>) {
        if let Some(part) = x.get(range) {
            // 16 floats: one 64-byte line.
            for line in part.chunks(16) {
                // SAFETY: a prefetch reads nothing architecturally; SSE is baseline on x86_64.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
            }
        }
    }

    /// Pixels `ox..ox + p` (`p` in 1..=16) of output row `oy` for channels `cb..cb + 16`
    /// (those below `c`), their first tap at `base` in the copy: the bias, every tap and the
    /// activation on 16 channels per register, turned to 16 pixels per channel and stored.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; every read lies inside the copy (see [`Lanes::rows`]).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn lanes_tile(
        t: &Lanes<'_>,
        base: *const f32,
        (oy, ox, p): (usize, usize, usize),
        cb: usize,
        yd: &Disjoint<f32>,
    ) {
        if t.y_nhwc {
            macro_rules! by_width {
                ($($n:literal)*) => {
                    match p {
                        $($n => store_nhwc::<$n>(t, base, (oy, ox), cb, yd),)*
                        _ => {}
                    }
                };
            }
            by_width!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
            return;
        }
        macro_rules! by_width {
            ($($n:literal)*) => {
                match p {
                    $($n => lanes_sums::<$n>(t, base, cb),)*
                    _ => return,
                }
            };
        }
        let acc = by_width!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
        let plane = t.oh * t.ow;
        let mask = ((1u32 << p) - 1) as u16;
        for (i, v) in transpose16(acc).into_iter().enumerate() {
            let ch = cb + i;
            if ch >= t.c {
                break;
            }
            // SAFETY: this task alone writes row `oy` of every channel.
            let out = unsafe { yd.part(ch * plane + oy * t.ow + ox, p) };
            _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, v);
        }
    }

    /// Channel blocks of 16 an edge pixel computes together: as many independent chains of
    /// multiply-adds. One block per call, each a chain of dependent multiply-adds, was 5 % of
    /// MobileNetV2's samples and left its 14x14 and 7x7 depthwise layers (a quarter to half
    /// of their pixels on the left or right edge) at twice ONNX Runtime's time.
    pub(super) const EDGE_BLOCKS: usize = 4;

    /// Output pixel `(oy, ox)` for channels `cb..cb + 16 * EDGE_BLOCKS` (fewer at the end of
    /// the channels) from the channels-last image `xb`, read in place: the bias, the taps
    /// inside the image in order (tap rows `ky0..ky1`, the first reading input row `iy0`), the
    /// activation; stored as [`lanes_tile`] stores a one-pixel tile. `false` (nothing stored)
    /// where a tap would read past `xb`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; `t.wt` holds every tap's row and `t.bv` one row (checked by
    /// [`Lanes::rows_in_place`]), `cb < t.c` and `t.c` a multiple of 16 no larger than
    /// `t.stride`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn edge_pixel(
        t: &Lanes<'_>,
        at: &InPlace,
        xb: &[f32],
        pixel: (usize, usize),
        rows: (usize, usize, usize),
        cb: usize,
        yd: &Disjoint<f32>,
    ) -> bool {
        // SAFETY: forwarded from the caller.
        unsafe {
            match (t.c - cb) / 16 {
                1 => edge_blocks::<1>(t, at, xb, pixel, rows, cb, yd),
                2 => edge_blocks::<2>(t, at, xb, pixel, rows, cb, yd),
                3 => edge_blocks::<3>(t, at, xb, pixel, rows, cb, yd),
                _ => edge_blocks::<EDGE_BLOCKS>(t, at, xb, pixel, rows, cb, yd),
            }
        }
    }

    /// [`edge_pixel`] for exactly `G` blocks of 16 channels.
    ///
    /// # Safety
    /// As [`edge_pixel`], with `cb + 16 * G <= t.c`.
    #[target_feature(enable = "avx512f")]
    unsafe fn edge_blocks<const G: usize>(
        t: &Lanes<'_>,
        at: &InPlace,
        xb: &[f32],
        (oy, ox): (usize, usize),
        (ky0, ky1, iy0): (usize, usize, usize),
        cb: usize,
        yd: &Disjoint<f32>,
    ) -> bool {
        let c = t.c;
        let (kx0, kx1, ix0) = at.tap_cols(ox);
        let mut acc: [__m512; G] =
            std::array::from_fn(|g| _mm512_loadu_ps(t.bv.as_ptr().add(cb + 16 * g)));
        if kx0 < kx1 && ky0 < ky1 {
            // The last tap read: checked once for the unchecked loads below.
            let last = at.last_tap((ky0, ky1, iy0), (kx0, kx1, ix0)) * c + cb + 16 * G;
            if last > xb.len() {
                return false;
            }
            for ky in ky0..ky1 {
                let row = (iy0 + (ky - ky0) * at.dh) * at.iw;
                for kx in kx0..kx1 {
                    let from = xb.as_ptr().add((row + ix0 + (kx - kx0) * at.dw) * c + cb);
                    let w = t.wt.as_ptr().add((ky * at.kw + kx) * t.stride + cb);
                    for (g, a) in acc.iter_mut().enumerate() {
                        let wv = _mm512_loadu_ps(w.add(16 * g));
                        *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(from.add(16 * g)), *a);
                    }
                }
            }
        }
        let pix = oy * t.ow + ox;
        let plane = t.oh * t.ow;
        for (g, &a) in acc.iter().enumerate() {
            let v = t.act.apply512(a);
            let cg = cb + 16 * g;
            if t.y_nhwc {
                // SAFETY: this task alone writes row `oy` of the image.
                let out = unsafe { yd.part(pix * c + cg, 16) };
                _mm512_storeu_ps(out.as_mut_ptr(), v);
                continue;
            }
            let mut l = [0f32; 16];
            _mm512_storeu_ps(l.as_mut_ptr(), v);
            for (i, &v) in l.iter().enumerate() {
                // SAFETY: this task alone writes row `oy` of every channel.
                let out = unsafe { yd.part((cg + i) * plane + pix, 1) };
                out[0] = v;
            }
        }
        true
    }

    /// The bias and every tap of [`lanes_tile`] for exactly `P` pixels (not activated).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tap_sums<const P: usize>(t: &Lanes<'_>, base: *const f32, cb: usize) -> [__m512; P] {
        let bias = _mm512_loadu_ps(t.bv.as_ptr().add(cb));
        let mut acc = [bias; P];
        for (k, &off) in t.offsets.iter().enumerate() {
            let wv = _mm512_loadu_ps(t.wt.as_ptr().add(k * t.stride + cb));
            let q = base.add(off);
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(q.add(j * t.pix_step)), *a);
            }
        }
        acc
    }

    /// The activated sums of [`lanes_tile`] for exactly `P` pixels (rows past `P` zero), for
    /// the transpose to NCHW.
    #[target_feature(enable = "avx512f")]
    unsafe fn lanes_sums<const P: usize>(
        t: &Lanes<'_>,
        base: *const f32,
        cb: usize,
    ) -> [__m512; 16] {
        let mut out = [_mm512_setzero_ps(); 16];
        for (o, a) in out.iter_mut().zip(tap_sums::<P>(t, base, cb)) {
            *o = t.act.apply512(a);
        }
        out
    }

    /// [`lanes_tile`] into a channels-last y: pixel `j`'s 16 channels are its sum as computed,
    /// stored where it is made rather than returned in the transpose's array of 16 registers
    /// and copied out per tile.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_nhwc<const P: usize>(
        t: &Lanes<'_>,
        base: *const f32,
        (oy, ox): (usize, usize),
        cb: usize,
        yd: &Disjoint<f32>,
    ) {
        let lanes = (t.c - cb).min(16);
        let mask = ((1u32 << lanes) - 1) as u16;
        for (j, a) in tap_sums::<P>(t, base, cb).into_iter().enumerate() {
            // SAFETY: this task alone writes row `oy` of the image.
            let out = unsafe { yd.part((oy * t.ow + ox + j) * t.c + cb, lanes) };
            _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, t.act.apply512(a));
        }
    }

    /// Stores the run `v` at `out[dst..dst + len]`.
    #[target_feature(enable = "avx2,fma")]
    fn store(out: &mut [f32], dst: usize, len: usize, v: __m256) {
        store_first(&mut out[dst..dst + len], v);
    }

    /// [`super::channel`] with [`RUNS`] runs in flight, one FMA per tap and run.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `copy.len() >= pad.len`, `out.len() >= oh * ow`,
    /// `offsets.len() == weights.len()`, and every offset is one [`Padded::taps`] made for
    /// `pad` (so each run's reads stay inside the copy).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn channel(
        copy: &[f32],
        pad: &Padded,
        offsets: &[usize],
        weights: &[f32],
        b: f32,
        act: Activation,
        out: &mut [f32],
    ) {
        let p = copy.as_ptr();
        let bias = _mm256_set1_ps(b);
        let mut runs = Runs::new(pad);
        loop {
            let (at, n) = runs.next_group();
            if n < RUNS {
                // The last few runs, one at a time.
                for &(src, dst, len) in &at[..n] {
                    let mut a = bias;
                    for (&off, &w) in offsets.iter().zip(weights) {
                        // SAFETY: src + off + LANES <= pad.len <= copy.len() (caller).
                        let x = unsafe { _mm256_loadu_ps(p.add(src + off)) };
                        a = _mm256_fmadd_ps(_mm256_set1_ps(w), x, a);
                    }
                    // SAFETY: the CPU has AVX2 and FMA (this function's features).
                    store(out, dst, len, unsafe { act.apply256(a) });
                }
                return;
            }
            let mut acc = [bias; RUNS];
            for (&off, &w) in offsets.iter().zip(weights) {
                let w = _mm256_set1_ps(w);
                for (a, &(src, _, _)) in acc.iter_mut().zip(&at) {
                    // SAFETY: as above.
                    *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(p.add(src + off)) }, *a);
                }
            }
            for (a, &(_, dst, len)) in acc.iter().zip(&at) {
                // SAFETY: as above.
                store(out, dst, len, unsafe { act.apply256(*a) });
            }
        }
    }

    /// Stores the first `len` lanes of the run `v` at `out[dst..dst + len]`.
    #[target_feature(enable = "avx512f")]
    fn store512(out: &mut [f32], dst: usize, len: usize, v: __m512) {
        let len = len.min(WIDE_LANES);
        let Some(o) = out.get_mut(dst..dst + len) else {
            return;
        };
        let mask = if len == WIDE_LANES {
            u16::MAX
        } else {
            (1u16 << len) - 1
        };
        // SAFETY: the mask stores `len` floats, which `o` holds.
        unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr(), mask, v) };
    }

    /// [`channel`] in runs of [`WIDE_LANES`] (`pad` built for them), [`RUNS`] runs in flight.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; as [`channel`] otherwise (each run's 16 reads stay inside the
    /// copy: `Padded::new` made the phase rows long enough for whole runs of 16).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn channel512(
        copy: &[f32],
        pad: &Padded,
        offsets: &[usize],
        weights: &[f32],
        b: f32,
        act: Activation,
        out: &mut [f32],
    ) {
        let p = copy.as_ptr();
        let bias = _mm512_set1_ps(b);
        let mut runs = Runs::new(pad);
        loop {
            let (at, n) = runs.next_group();
            if n < RUNS {
                for &(src, dst, len) in &at[..n] {
                    let mut a = bias;
                    for (&off, &w) in offsets.iter().zip(weights) {
                        // SAFETY: src + off + WIDE_LANES <= pad.len <= copy.len() (caller).
                        let x = unsafe { _mm512_loadu_ps(p.add(src + off)) };
                        a = _mm512_fmadd_ps(_mm512_set1_ps(w), x, a);
                    }
                    store512(out, dst, len, act.apply512(a));
                }
                return;
            }
            let mut acc = [bias; RUNS];
            for (&off, &w) in offsets.iter().zip(weights) {
                let w = _mm512_set1_ps(w);
                for (a, &(src, _, _)) in acc.iter_mut().zip(&at) {
                    // SAFETY: as above.
                    *a = _mm512_fmadd_ps(w, unsafe { _mm512_loadu_ps(p.add(src + off)) }, *a);
                }
            }
            for (a, &(_, dst, len)) in acc.iter().zip(&at) {
                store512(out, dst, len, act.apply512(*a));
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod prefetch_tests {
    /// The row hint is given ranges past the image's last row near its bottom (reversed
    /// once clamped to it): it must take them without slicing out of bounds.
    #[test]
    fn the_row_hint_takes_reversed_and_outside_ranges() {
        let x = vec![1.0f32; 40];
        #[allow(clippy::reversed_empty_ranges)]
        super::x86::prefetch_l2(&x, 30..10);
        super::x86::prefetch_l2(&x, 0..100);
        super::x86::prefetch_l2(&x, 0..40);
        super::x86::prefetch_l2(&x, 40..40);
        assert_eq!(x.iter().sum::<f32>(), 40.0, "a hint changes nothing");
    }
}

/// [`x86::lanes_tile`] with AVX2: a tile of 16 channels x up to 16 pixels as two halves of 8
/// channels (one register) x runs of up to 8 pixels, each run's sums in registers (one per
/// pixel, the tap's weights in one more), turned 8x8 and stored. Per plane (pixels in the
/// lanes), as AVX2 CPUs ran before, MobileNetV2's 17 depthwise layers took 4.8 ms at one
/// thread (Zen 3) against ONNX Runtime's 1.9.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::channels_last::x86::{store_first, transpose8};
    use super::x86::EDGE_BLOCKS;
    use super::{InPlace, Lanes};
    use crate::nn::Disjoint;
    use std::arch::x86_64::*;

    /// f32 lanes of an AVX2 register.
    const L: usize = 8;

    /// Pixels `ox..ox + p` (`p` in 1..=16) of output row `oy` for channels `cb..cb + 16`
    /// (those below `c`), their first tap at `base` in the copy.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; every read lies inside the copy (see [`Lanes::rows`]).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn lanes_tile(
        t: &Lanes<'_>,
        base: *const f32,
        (oy, ox, p): (usize, usize, usize),
        cb: usize,
        yd: &Disjoint<f32>,
    ) {
        for half in 0..2 {
            let ch0 = cb + half * L;
            if ch0 >= t.c {
                return;
            }
            for j0 in (0..p).step_by(L) {
                let pn = (p - j0).min(L);
                let at = base.add(half * L + j0 * t.pix_step);
                macro_rules! by_width {
                    ($($n:literal)*) => {
                        match pn {
                            $($n => tap_sums::<$n>(t, at, ch0),)*
                            _ => return,
                        }
                    };
                }
                let acc = by_width!(1 2 3 4 5 6 7 8);
                if t.y_nhwc {
                    let lanes = (t.c - ch0).min(L);
                    for (j, &a) in acc.iter().take(pn).enumerate() {
                        // SAFETY: this task alone writes row `oy` of the image.
                        let out = unsafe { yd.part((oy * t.ow + ox + j0 + j) * t.c + ch0, lanes) };
                        store_first(out, a);
                    }
                    continue;
                }
                let plane = t.oh * t.ow;
                for (i, v) in transpose8(acc).into_iter().enumerate() {
                    let ch = ch0 + i;
                    if ch >= t.c {
                        break;
                    }
                    // SAFETY: this task alone writes row `oy` of every channel.
                    let out = unsafe { yd.part(ch * plane + oy * t.ow + ox + j0, pn) };
                    store_first(out, v);
                }
            }
        }
    }

    /// The bias, every tap and the activation of `P` pixels of channels `ch..ch + 8`, the
    /// first pixel's first tap at `base` (rows past `P` zero, for the transpose).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tap_sums<const P: usize>(t: &Lanes<'_>, base: *const f32, ch: usize) -> [__m256; L] {
        let bias = _mm256_loadu_ps(t.bv.as_ptr().add(ch));
        let mut acc = [bias; P];
        for (k, &off) in t.offsets.iter().enumerate() {
            let wv = _mm256_loadu_ps(t.wt.as_ptr().add(k * t.stride + ch));
            let q = base.add(off);
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(q.add(j * t.pix_step)), *a);
            }
        }
        let mut out = [_mm256_setzero_ps(); L];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = t.act.apply256(a);
        }
        out
    }

    /// [`x86::edge_pixel`](super::x86::edge_pixel) on AVX2: the same pixel and channels
    /// (`16 * EDGE_BLOCKS`, fewer at the end), in registers of 8 channels.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; as [`x86::edge_pixel`](super::x86::edge_pixel).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn edge_pixel(
        t: &Lanes<'_>,
        at: &InPlace,
        xb: &[f32],
        pixel: (usize, usize),
        rows: (usize, usize, usize),
        cb: usize,
        yd: &Disjoint<f32>,
    ) -> bool {
        // `t.c - cb` is a multiple of 16 (caller): an even number of registers.
        // SAFETY: forwarded from the caller.
        unsafe {
            match (t.c - cb) / L {
                2 => edge_blocks::<2>(t, at, xb, pixel, rows, cb, yd),
                4 => edge_blocks::<4>(t, at, xb, pixel, rows, cb, yd),
                6 => edge_blocks::<6>(t, at, xb, pixel, rows, cb, yd),
                _ => edge_blocks::<{ 2 * EDGE_BLOCKS }>(t, at, xb, pixel, rows, cb, yd),
            }
        }
    }

    /// [`edge_pixel`] for exactly `G` registers of 8 channels.
    ///
    /// # Safety
    /// As [`edge_pixel`], with `cb + 8 * G <= t.c`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn edge_blocks<const G: usize>(
        t: &Lanes<'_>,
        at: &InPlace,
        xb: &[f32],
        (oy, ox): (usize, usize),
        (ky0, ky1, iy0): (usize, usize, usize),
        cb: usize,
        yd: &Disjoint<f32>,
    ) -> bool {
        let c = t.c;
        let (kx0, kx1, ix0) = at.tap_cols(ox);
        let mut acc: [__m256; G] =
            std::array::from_fn(|g| _mm256_loadu_ps(t.bv.as_ptr().add(cb + L * g)));
        if kx0 < kx1 && ky0 < ky1 {
            // The last tap read: checked once for the unchecked loads below.
            let last = at.last_tap((ky0, ky1, iy0), (kx0, kx1, ix0)) * c + cb + L * G;
            if last > xb.len() {
                return false;
            }
            for ky in ky0..ky1 {
                let row = (iy0 + (ky - ky0) * at.dh) * at.iw;
                for kx in kx0..kx1 {
                    let from = xb.as_ptr().add((row + ix0 + (kx - kx0) * at.dw) * c + cb);
                    let w = t.wt.as_ptr().add((ky * at.kw + kx) * t.stride + cb);
                    for (g, a) in acc.iter_mut().enumerate() {
                        let wv = _mm256_loadu_ps(w.add(L * g));
                        *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(from.add(L * g)), *a);
                    }
                }
            }
        }
        let pix = oy * t.ow + ox;
        let plane = t.oh * t.ow;
        for (g, &a) in acc.iter().enumerate() {
            let v = t.act.apply256(a);
            let cg = cb + L * g;
            if t.y_nhwc {
                // SAFETY: this task alone writes row `oy` of the image.
                let out = unsafe { yd.part(pix * c + cg, L) };
                _mm256_storeu_ps(out.as_mut_ptr(), v);
                continue;
            }
            let mut l = [0f32; L];
            _mm256_storeu_ps(l.as_mut_ptr(), v);
            for (i, &v) in l.iter().enumerate() {
                // SAFETY: this task alone writes row `oy` of every channel.
                let out = unsafe { yd.part((cg + i) * plane + pix, 1) };
                out[0] = v;
            }
        }
        true
    }
}
