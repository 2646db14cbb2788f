//! `opreg::FusedConvNhwc`: FusedConv with a channels-last (`[N, H, W, C]`) X and/or Y
//! (attributes `x_nhwc`, `y_nhwc`, each 1 by default; Z has Y's layout), written by the graph
//! pass `nhwc-conv` between convolutions (a MobileNet block's 1x1 and depthwise layers, a
//! ResNet's 1x1 and 3x3 ones).
//!
//! Why: the depthwise kernel computes with the channels in the lanes, so on NCHW values it
//! copied its input channels-last (a transpose in 16x16 register blocks) and turned every tile
//! back; on MobileNetV2 that was as long as the taps themselves (profiled: its 17 depthwise
//! layers 2.1 ms, ONNX Runtime's NCHWc ones 0.64). A 1x1 convolution is a gemm that reads
//! and writes either layout: the layout is only the operands' strides (`Y^T = X^T W^T`). So
//! the pass lets the expanding 1x1 layer write its output channels-last, the depthwise layer
//! read it so and write channels-last too, and the projecting 1x1 layer read that. The direct
//! kernel of the other convolutions of one group ([`direct`]) copies a channels-last X a
//! block of 16 channels at a time (no transpose) and stores channels-last tiles as they are.
//!
//! Runs here: 1x1 with no padding and one group (strided: the pixels it reads first, in X's
//! layout), depthwise (one input and one output channel per group), and other 2-D f32
//! convolutions of one group.

use super::{depthwise, direct, finish, optional, stem, with_epilogue, Activation, Conv, Sum};
use crate::nn::{blas, conv_bias};
use crate::util::required;
use opreg_sdk::alloc::{checked_numel, try_vec};
use opreg_sdk::prelude::*;

const OP: &str = "FusedConvNhwc";

/// Output channels below which a 1x1 layer from channels-last to NCHW multiplies
/// `W X^T` (weights packed as the left operand, rows of C stored as they are) rather than the
/// transposed `X W^T`: a product of fewer columns than the BLAS's widest tile (32) wastes
/// its lanes (MobileNetV2's 16- and 24-channel projections).
pub(super) const LEFT_BELOW: usize = 32;

impl Conv {
    /// [`Kernel::compute`] for a convolution with a channels-last X or Y.
    pub(super) fn compute_nhwc(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [xv, wv] = required(OP, inputs, ["X", "W"])?;
        let (xs, ws) = (xv.shape(), wv.shape());
        let (&[n, d1, d2, d3], &[m, cg, _, _]) = (xs, ws) else {
            return Err(PluginError::invalid(format!(
                "{OP}: X {xs:?} and W {ws:?} must be 4-D (2-D convolutions only)"
            )));
        };
        let l = self.layouts;
        let (c, ih, iw) = if l.x_nhwc { (d3, d1, d2) } else { (d1, d2, d3) };
        let group = self.group;
        if cg.checked_mul(group) != Some(c) || m % group != 0 {
            return Err(PluginError::invalid(format!(
                "{OP}: W {ws:?} does not fit X {xs:?} (x_nhwc {}) with group {group}",
                l.x_nhwc as u8
            )));
        }
        let z = optional(inputs, 3).copied();
        if let Some(v) = [Some(xv), Some(wv), optional(inputs, 2).copied(), z]
            .into_iter()
            .flatten()
            .find(|v| v.dtype != DType::F32)
        {
            return Err(PluginError::unimplemented(format!(
                "{OP} runs in f32 only, got {}",
                v.dtype
            )));
        }
        let g = self.window.resolve(OP, &[ih, iw], Some(&ws[2..]))?;
        let (oh, ow) = (g.out[0], g.out[1]);
        let out_shape = if l.y_nhwc {
            [n, oh, ow, m]
        } else {
            [n, m, oh, ow]
        };
        if let Some(z) = z.filter(|z| z.shape() != out_shape) {
            return Err(PluginError::invalid(format!(
                "{OP}: Z {:?} must have Y's shape {out_shape:?} (it does not broadcast)",
                z.shape()
            )));
        }
        let pointwise = group == 1
            && g.kernel.iter().all(|&k| k == 1)
            && g.pad_begin.iter().chain(&g.pad_end).all(|&p| p == 0);
        let nchw = [n, c, ih, iw];
        // Any other 2-D convolution of one group reads and writes either layout (the direct
        // kernel's copy takes a channels-last image's blocks of channels as they lie, and
        // its tiles are stored pixel by pixel): a ResNet's 3x3 layers between its 1x1 ones.
        let general = group == 1 && !pointwise;
        if !pointwise && !depthwise::applies(&nchw, group, m) && !general {
            return Err(PluginError::unimplemented(format!(
                "{OP}: only 1x1 convolutions (no padding, one group), depthwise ones, and others of one group run channels-last, not W {ws:?} with group {group}"
            )));
        }
        let x = xv.as_slice::<f32>()?;
        let w = wv.as_slice::<f32>()?;
        let bias = conv_bias(OP, inputs, m)?;
        let y = ctx.output_slice_to_overwrite::<f32>(0, &out_shape)?;
        // The host may place Y over Z (the alias registered with the kernel, when nothing
        // reads Z after this node): Z's elements are then Y's, and no slice of Z may live
        // while Y is written. A 1x1 layer sums into them in its product (beta 1: no pass over
        // a separate Z, and Y's cache lines are read anyway: a prototype on AVX-512 took
        // ResNet-50's first Z layer from 1.24 to 1.06 ms; on AVX2 the product is the cost);
        // the other paths read Z where they write Y, so they take a copy of it first.
        let in_place = z.is_some_and(|v| std::ptr::eq(v.data, y.as_ptr().cast()));
        let copied;
        let z = match z {
            Some(_) if in_place && pointwise => None,
            Some(_) if in_place => {
                copied = ctx.scratch_reused::<f32>(y.len())?;
                copied.copy_from_slice(y);
                Some(&*copied)
            }
            z => z.map(|v| v.as_slice::<f32>()).transpose()?,
        };
        let act = self.activation;
        let p = oh * ow;
        if pointwise {
            let sum = if in_place { Sum::InY } else { Sum::from(z) };
            if g.strides.iter().any(|&s| s > 1) {
                // A strided 1x1 layer (a ResNet's downsampling shortcut) reads every
                // `s`-th pixel: those pixels first, in X's layout, then the plain product.
                let sub = ctx.scratch_reused::<f32>(checked_numel(&[n, c, p])?)?;
                subsample(
                    ctx,
                    x,
                    l.x_nhwc,
                    (n, c),
                    (ih, iw),
                    (oh, ow),
                    &g.strides,
                    sub,
                )?;
                return self.pointwise(ctx, (n, c, p, m), sub, w, bias, sum, y);
            }
            return self.pointwise(ctx, (n, c, p, m), x, w, bias, sum, y);
        }
        if general {
            // A first layer (NCHW image in, a channels-last MaxPool after it) in the stem's
            // pixel tiles, turned channels-last as stored.
            if !l.x_nhwc
                && stem::applies(&nchw, &g, group)
                && stem::keeps(m, l.y_nhwc)
                && stem::run(
                    ctx,
                    &nchw,
                    &g,
                    m,
                    x,
                    w,
                    self.stem_packing(),
                    bias,
                    z,
                    act,
                    (&mut *y, l.y_nhwc),
                )?
            {
                return Ok(());
            }
            if direct::applies(&nchw, &g, group)
                && direct::run(
                    ctx,
                    &nchw,
                    &g,
                    m,
                    x,
                    w,
                    self.direct_packing(),
                    bias,
                    z,
                    act,
                    (&mut *y, l),
                )?
            {
                return Ok(());
            }
            // Else (a CPU without AVX-512, a geometry the direct kernel leaves): through
            // NCHW, X turned first and Y after.
            let x_nchw;
            let x = if l.x_nhwc {
                x_nchw = transposed(x, n, (ih * iw, c))?;
                &x_nchw[..]
            } else {
                x
            };
            if !l.y_nhwc {
                return self.run(ctx, &nchw, &g, m, x, w, bias, z.into(), act, y);
            }
            let mut tmp = try_vec(y.len(), 0.0f32)?;
            self.run(
                ctx,
                &nchw,
                &g,
                m,
                x,
                w,
                bias,
                Sum::None,
                Activation::None,
                &mut tmp,
            )?;
            y.copy_from_slice(&transposed(&tmp, n, (m, p))?);
            return finish_any(ctx, y, None, z, act, (m, p), true);
        }
        if z.is_none() {
            return depthwise::run(
                ctx,
                &nchw,
                &g,
                (x, w, self.depthwise_packing()),
                bias,
                act,
                y,
                l,
            );
        }
        // Z after the taps (as the Add it replaces would), then the activation.
        depthwise::run(
            ctx,
            &nchw,
            &g,
            (x, w, self.depthwise_packing()),
            bias,
            Activation::None,
            y,
            l,
        )?;
        finish_any(ctx, y, None, z, act, (m, p), l.y_nhwc)
    }

    /// The 1x1 convolution of `n` images of `p` pixels, `c` channels in and `m` out, as one
    /// gemm per image in the layouts asked for (one for the batch when both are channels-last),
    /// the bias and activation in its tiles where the backend can.
    #[allow(clippy::too_many_arguments)]
    fn pointwise(
        &self,
        ctx: &KernelContext<'_>,
        (n, c, p, m): (usize, usize, usize, usize),
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        sum: Sum<'_>,
        y: &mut [f32],
    ) -> Result<(), PluginError> {
        let l = self.layouts;
        if y.is_empty() {
            return Ok(());
        }
        let image = checked_numel(&[p, c])?;
        let out = checked_numel(&[p, m])?;
        if x.len() < n * image || y.len() < n * out || w.len() < m * c {
            return Err(PluginError::internal(format!(
                "{OP}: operands too short for {n} images of {p} pixels, {c} -> {m} channels"
            )));
        }
        // The weights as packed at load (see `LEFT_BELOW`): W^T (c x m) as the right operand,
        // or W (m x c) as the left one for a narrow NCHW output.
        let (packed, left) = match &self.packed {
            Some(super::Packed::Right(pk)) => (Some(pk), false),
            Some(super::Packed::Left(pk)) if !l.y_nhwc => (Some(pk), true),
            _ => (None, false),
        };
        let packed = packed.filter(|pk| pk.info().k == c && pk.info().n == m);
        // Both channels-last: the batch is one product of `n * p` rows.
        let (images, rows) = if l.x_nhwc && l.y_nhwc {
            (1, n * p)
        } else {
            (n, p)
        };
        // Z already in Y: the product adds itself to it.
        let beta = if matches!(sum, Sum::InY) { 1.0 } else { 0.0 };
        let args = |b: usize, y: &mut [f32]| {
            if left {
                // Y_b (m x p) = W (m x c) X_b^T (c x p), X_b (p x c) channels-last.
                let mut g = GemmArgs::new(GemmTypes::F32, m, p, c);
                g.flags = GemmArgs::PACKED_A;
                g.a = w.as_ptr().cast();
                g.lda = c.max(1);
                g.b = x[b * p * c..].as_ptr().cast();
                g.trans_b = Transpose::YES;
                g.ldb = c.max(1);
                g.c = y[b * m * p..].as_mut_ptr().cast();
                g.ldc = p.max(1);
                g.beta = beta;
                return g;
            }
            // The product `pixels x channels`: Y_b (rows x m) = X_b (rows x c) W^T (c x m),
            // X_b read transposed when NCHW, Y_b stored transposed (column-major) when NCHW.
            let mut g = GemmArgs::new(GemmTypes::F32, rows, m, c);
            g.a = x[b * rows * c..].as_ptr().cast();
            g.b = w.as_ptr().cast();
            g.c = y[b * rows * m..].as_mut_ptr().cast();
            g.beta = beta;
            if l.y_nhwc {
                if l.x_nhwc {
                    g.lda = c.max(1);
                } else {
                    g.trans_a = Transpose::YES;
                    g.lda = rows.max(1);
                }
                // W (m x c) row-major read transposed; packed, it is W^T already.
                if packed.is_none() {
                    g.trans_b = Transpose::YES;
                }
                g.ldb = if packed.is_none() { c.max(1) } else { m.max(1) };
                g.ldc = m.max(1);
            } else {
                // Column-major: C (rows x m) at ldc = rows is Y_b NCHW, X_b (rows x c
                // row-major) is op(A) of a transposed column-major A, W (m x c row-major) is
                // the column-major W^T.
                g.layout = Layout::COL_MAJOR;
                g.trans_a = Transpose::YES;
                g.lda = c.max(1);
                g.ldb = c.max(1);
                g.ldc = rows.max(1);
            }
            g
        };
        let blas = blas(ctx, OP)?;
        // The bias in the tiles, and the activation too unless a Z apart comes first (the
        // unfused graph's rounding order: ((product + bias) + Z), then the activation; Z in
        // Y is summed in the tiles, before the activation).
        let code = match sum {
            Sum::None | Sum::InY => self.activation.blas_epilogue(),
            Sum::Apart(_) => Some(Epilogue::NONE),
        };
        // One bias per output channel: per column of the product, per row of `left`'s.
        let epilogue = code.filter(|&code| {
            let mut probe = args(0, y);
            with_epilogue(&mut probe, left, bias, code);
            blas.supports(&probe)
        });
        for b in 0..images {
            let mut g = args(b, y);
            if let Some(code) = epilogue {
                with_epilogue(&mut g, left, bias, code);
            }
            match packed {
                Some(pk) => blas.gemm_packed(ctx, &g, pk)?,
                None => blas.gemm(ctx, &g)?,
            }
        }
        let act = self.activation;
        match (epilogue, sum) {
            // Everything done in the tiles.
            (Some(_), Sum::None | Sum::InY) => Ok(()),
            // The bias done: Z, then the activation.
            (Some(_), Sum::Apart(z)) => finish_any(ctx, y, None, Some(z), act, (m, p), l.y_nhwc),
            (None, Sum::Apart(z)) => finish_any(ctx, y, bias, Some(z), act, (m, p), l.y_nhwc),
            (None, Sum::None | Sum::InY) => finish_any(ctx, y, bias, None, act, (m, p), l.y_nhwc),
        }
    }
}

/// `v = act((v + bias[channel]) + z)` over `y` of `m` channels of `p` pixels per image,
/// channels-last or NCHW; nothing when there is nothing to do.
fn finish_any(
    ctx: &KernelContext<'_>,
    y: &mut [f32],
    bias: Option<&[f32]>,
    z: Option<&[f32]>,
    act: Activation,
    (m, p): (usize, usize),
    y_nhwc: bool,
) -> Result<(), PluginError> {
    if !y_nhwc {
        return finish(ctx, y, bias, z, act, m, p);
    }
    if (bias.is_none() && z.is_none() && act == Activation::None) || m == 0 {
        return Ok(());
    }
    if bias.is_some_and(|b| b.len() < m) || z.is_some_and(|z| z.len() < y.len()) {
        return Err(PluginError::internal(format!(
            "{OP}: a bias or Z shorter than the output"
        )));
    }
    let rows = (4096 / m).max(1);
    // Chunks of whole rows (`rows * m` values), so that each row starts at channel 0.
    ctx.parallel_chunks(y, rows * m, |start, chunk| {
        for (i, row) in chunk.chunks_mut(m).enumerate() {
            let at = start + i * m;
            super::finish_row(row, bias, z.and_then(|z| z.get(at..at + row.len())), act);
        }
    })
}

/// The pixels a strided 1x1 convolution reads (`(oy * sh, ox * sw)` for each output pixel) of
/// `n` images of `c` channels, in the images' layout (channels-last when `nhwc`), into `out`
/// (`n * c * oh * ow` values, every one written: it may be reused scratch). Output rows are
/// spread over the threads (ResNet-18's 56x56 64->128 shortcut at batch 8, copied by one
/// thread: 0.57 ms in all; by both: 0.51).
#[allow(clippy::too_many_arguments)]
fn subsample(
    ctx: &KernelContext<'_>,
    x: &[f32],
    nhwc: bool,
    (n, c): (usize, usize),
    (ih, iw): (usize, usize),
    (oh, ow): (usize, usize),
    strides: &[usize],
    out: &mut [f32],
) -> Result<(), PluginError> {
    let (sh, sw) = (strides[0].max(1), strides[1].max(1));
    let image = checked_numel(&[c, ih, iw])?;
    let sub = checked_numel(&[c, oh, ow])?;
    let total = checked_numel(&[n, sub])?;
    if x.len() < checked_numel(&[n, image])?
        || out.len() < total
        || (oh > 0 && (oh - 1) * sh >= ih)
        || (ow > 0 && (ow - 1) * sw >= iw)
    {
        return Err(PluginError::internal(format!(
            "{OP}: X is shorter than the pixels a strided 1x1 layer reads"
        )));
    }
    if image == 0 || sub == 0 {
        return Ok(());
    }
    // One output row: of an image's pixels (channels-last), or of one channel's plane.
    let unit = if nhwc { ow * c } else { ow };
    let grain = (4096 / unit).max(1) * unit;
    ctx.parallel_chunks(&mut out[..total], grain, |start, chunk| {
        for (i, orow) in chunk.chunks_exact_mut(unit).enumerate() {
            // Row `r` of all the output rows: of image `r / oh` (channels-last) or of plane
            // `r / oh` of all the images' planes (NCHW, whose planes follow one another).
            let r = start / unit + i;
            let (at, oy) = (r / oh, r % oh);
            if nhwc {
                let xb = &x[at * image..(at + 1) * image];
                for (ox, o) in orow.chunks_exact_mut(c).enumerate() {
                    let from = (oy * sh * iw + ox * sw) * c;
                    o.copy_from_slice(&xb[from..from + c]);
                }
            } else {
                let row = &x[at * ih * iw + oy * sh * iw..][..iw];
                for (d, v) in orow.iter_mut().zip(row.iter().step_by(sw)) {
                    *d = *v;
                }
            }
        }
    })
}

/// `src` (`n` images of `a x b`, a-major) as `n` images of `b x a`: NCHW <-> NHWC with `(a, b)`
/// = `(C, H*W)` or `(H*W, C)`. For the fallbacks (a CPU without AVX-512, a geometry the direct
/// kernel leaves).
pub(super) fn transposed(
    src: &[f32],
    n: usize,
    (a, b): (usize, usize),
) -> Result<Vec<f32>, PluginError> {
    let image = checked_numel(&[a, b])?;
    let mut out = try_vec(checked_numel(&[n, image])?, 0.0f32)?;
    for (s, d) in src
        .chunks_exact(image.max(1))
        .zip(out.chunks_exact_mut(image.max(1)))
    {
        for i in 0..a {
            for j in 0..b {
                d[j * a + i] = s[i * b + j];
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{conv_factory, depthwise};
    use super::transposed;
    use crate::nn::testblas::{NaiveBlas, NaiveEpilogueBlas};
    use opreg_sdk::host::HostTensor;
    use opreg_sdk::prelude::*;
    use opreg_sdk::testkit::{run_kernel_opt, NodeSpec};

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 37 + seed * 11) % 23) as f32 - 11.0) / 7.0)
            .collect()
    }

    /// One convolution of the cases: X's NCHW shape, W's shape, group, strides, pads.
    struct Case {
        x: [usize; 4],
        w: [usize; 4],
        group: usize,
        strides: [i64; 2],
        pads: [i64; 4],
        dilations: [i64; 2],
    }

    /// `n x a x b` images to `n x b x a`.
    fn turn(v: &[f32], n: usize, ab: (usize, usize)) -> Vec<f32> {
        transposed(v, n, ab).expect("transpose")
    }

    /// Every layout pair of FusedConvNhwc, with and without bias and Z, each activation, on
    /// a backend with and without the epilogues (and for depthwise ones the per-plane loop
    /// too), against FusedConv on the NCHW operands: the same bits.
    #[test]
    fn channels_last_convolutions_equal_the_nchw_ones() {
        let cases = [
            // 1x1: a partial register of channels, pixels across the 16 lanes, two images.
            Case {
                x: [2, 5, 3, 7],
                w: [20, 5, 1, 1],
                group: 1,
                strides: [1, 1],
                pads: [0; 4],
                dilations: [1; 2],
            },
            Case {
                x: [1, 33, 4, 5],
                w: [17, 33, 1, 1],
                group: 1,
                strides: [1, 1],
                pads: [0; 4],
                dilations: [1; 2],
            },
            // Depthwise: padded 3x3 across a row of 16+ pixels, stride 2, 5x5, 7 wide.
            Case {
                x: [2, 20, 5, 19],
                w: [20, 1, 3, 3],
                group: 20,
                strides: [1, 1],
                pads: [1; 4],
                dilations: [1; 2],
            },
            Case {
                x: [1, 17, 9, 11],
                w: [17, 1, 3, 3],
                group: 17,
                strides: [2, 2],
                pads: [0, 0, 1, 1],
                dilations: [1; 2],
            },
            Case {
                x: [1, 32, 7, 7],
                w: [32, 1, 5, 5],
                group: 32,
                strides: [1, 1],
                pads: [2; 4],
                dilations: [1; 2],
            },
            // Whole registers of channels (read in place, the margin pixel by pixel): two
            // images strided, a row of 16 + 16 + 7 inner pixels with uneven pads, dilated.
            Case {
                x: [2, 16, 9, 37],
                w: [16, 1, 3, 3],
                group: 16,
                strides: [2, 2],
                pads: [1; 4],
                dilations: [1; 2],
            },
            Case {
                x: [1, 32, 6, 40],
                w: [32, 1, 3, 3],
                group: 32,
                strides: [1, 1],
                pads: [0, 1, 1, 0],
                dilations: [1; 2],
            },
            Case {
                x: [1, 16, 8, 9],
                w: [16, 1, 3, 3],
                group: 16,
                strides: [1, 2],
                pads: [2, 1, 2, 3],
                dilations: [2, 3],
            },
            // Five registers of channels: the margin pixels in a group of four blocks and one
            // of one (MobileNetV2's 14x14 and 7x7 layers).
            Case {
                x: [1, 80, 7, 7],
                w: [80, 1, 3, 3],
                group: 80,
                strides: [1, 1],
                pads: [1; 4],
                dilations: [1; 2],
            },
            // One group, past 1x1 (a first layer): output channels in a partial register, over
            // two blocks, two images; dilated with uneven pads.
            Case {
                x: [1, 3, 17, 19],
                w: [20, 3, 3, 3],
                group: 1,
                strides: [2, 2],
                pads: [1; 4],
                dilations: [1; 2],
            },
            Case {
                x: [2, 3, 12, 12],
                w: [40, 3, 7, 7],
                group: 1,
                strides: [2, 2],
                pads: [3; 4],
                dilations: [1; 2],
            },
            Case {
                x: [1, 5, 9, 10],
                w: [16, 5, 3, 2],
                group: 1,
                strides: [1, 2],
                pads: [0, 2, 1, 1],
                dilations: [2, 1],
            },
            // A ResNet's 3x3 layers: two blocks of input channels, the second partial (the
            // copy's fixed 16-channel moves and its run-time ones), stride 1 and 2.
            Case {
                x: [2, 20, 6, 9],
                w: [20, 20, 3, 3],
                group: 1,
                strides: [1, 1],
                pads: [1; 4],
                dilations: [1; 2],
            },
            Case {
                x: [1, 32, 9, 10],
                w: [40, 32, 3, 3],
                group: 1,
                strides: [2, 2],
                pads: [1; 4],
                dilations: [1; 2],
            },
            // First layers the stem's pixel tiles take (at most 4 channels in, rows of 32 or
            // more): channels-last Y turned in registers, a partial last block of 8 channels
            // and a partial last register of pixels.
            Case {
                x: [1, 3, 7, 70],
                w: [20, 3, 3, 3],
                group: 1,
                strides: [2, 2],
                pads: [1; 4],
                dilations: [1; 2],
            },
            Case {
                x: [2, 3, 5, 67],
                w: [8, 3, 7, 7],
                group: 1,
                strides: [2, 2],
                pads: [3; 4],
                dilations: [1; 2],
            },
            // Strided 1x1 (a downsampling shortcut), two images, uneven strides.
            Case {
                x: [2, 20, 7, 9],
                w: [24, 20, 1, 1],
                group: 1,
                strides: [2, 2],
                pads: [0; 4],
                dilations: [1; 2],
            },
            Case {
                x: [1, 9, 5, 8],
                w: [33, 9, 1, 1],
                group: 1,
                strides: [2, 3],
                pads: [0; 4],
                dilations: [1; 2],
            },
        ];
        let acts: [(&str, Vec<f32>); 4] = [
            ("", vec![]),
            ("Clip", vec![0.0, 6.0]),
            ("LeakyRelu", vec![0.1]),
            ("SiLU", vec![]),
        ];
        for case in &cases {
            let [n, c, ih, iw] = case.x;
            let m = case.w[0];
            let mut x = data(case.x.iter().product(), 1);
            x[3] = f32::NAN;
            let w = data(case.w.iter().product(), 2);
            let b = data(m, 3);
            let tw = HostTensor::from_vec(&case.w, &w).expect("w");
            let tb = HostTensor::from_vec(&[m], &b).expect("b");
            let node = |op: &str, act: &str, params: &[f32]| {
                let mut s = NodeSpec::onnx(op, 1)
                    .domain("opreg")
                    .attr("group", AttrValue::Int(case.group as i64))
                    .attr("strides", AttrValue::Ints(case.strides.to_vec()))
                    .attr("pads", AttrValue::Ints(case.pads.to_vec()))
                    .attr("dilations", AttrValue::Ints(case.dilations.to_vec()));
                if !act.is_empty() {
                    s = s
                        .attr("activation", AttrValue::String(act.into()))
                        .attr("activation_params", AttrValue::Floats(params.to_vec()));
                }
                s
            };
            let depthwise = case.group > 1;
            // Depthwise: the channels-in-lanes loop, the per-plane one, and where the CPU has
            // AVX-512 the AVX2 tiles too (see `direct::TEST_AVX2`).
            let both = crate::simd::has_avx512() && crate::simd::has_avx2_fma();
            let variants = [(false, false), (true, false), (false, true)];
            let runs = match (depthwise, both) {
                (false, _) => 1,
                (true, false) => 2,
                (true, true) => 3,
            };
            for &(planes, avx2) in &variants[..runs] {
                depthwise::PLANES_ONLY.with(|f| f.set(planes));
                super::super::direct::TEST_AVX2.set(avx2);
                for ((act, params), epilogues, with_bias) in acts.iter().flat_map(|a| {
                    [
                        (a, false, true),
                        (a, true, true),
                        (a, true, false),
                        (a, false, false),
                    ]
                }) {
                    let blas = || -> Box<dyn Blas> {
                        if epilogues {
                            Box::new(NaiveEpilogueBlas)
                        } else {
                            Box::new(NaiveBlas)
                        }
                    };
                    let tx = HostTensor::from_vec(&case.x, &x).expect("x");
                    let bias = with_bias.then_some(&tb);
                    let nchw = |inputs: &[Option<&HostTensor>]| {
                        run_kernel_opt(
                            conv_factory,
                            &node("FusedConv", act, params),
                            inputs,
                            Some(blas()),
                        )
                        .expect("nchw")
                        .remove(0)
                    };
                    let plain = nchw(&[Some(&tx), Some(&tw), bias]);
                    let ys = plain.shape().to_vec();
                    let (oh, ow) = (ys[2], ys[3]);
                    let want = plain.to_vec::<f32>().expect("f32");
                    let z = data(want.len(), 4);
                    let tz = HostTensor::from_vec(&ys, &z).expect("z");
                    let want_z = nchw(&[Some(&tx), Some(&tw), bias, Some(&tz)])
                        .to_vec::<f32>()
                        .expect("f32");
                    // A first layer's channels-last X leaves the stem's tiles (they read NCHW
                    // planes) for the channels-in-lanes kernel, which sums in another order:
                    // only its channels-last Y is the stem's.
                    let stem_case = case.x[1] <= 4 && case.w[2] * case.w[3] > 1;
                    for (xl, yl) in [(true, false), (false, true), (true, true)]
                        .into_iter()
                        .filter(|&(xl, _)| !(stem_case && xl))
                    {
                        let xv = if xl {
                            turn(&x, n, (c, ih * iw))
                        } else {
                            x.clone()
                        };
                        let xshape = if xl { [n, ih, iw, c] } else { case.x };
                        let yshape = if yl { [n, oh, ow, m] } else { [n, m, oh, ow] };
                        let tx = HostTensor::from_vec(&xshape, &xv).expect("x");
                        let layout = |want: &[f32]| {
                            if yl {
                                turn(want, n, (m, oh * ow))
                            } else {
                                want.to_vec()
                            }
                        };
                        let zv = HostTensor::from_vec(&yshape, &layout(&z)).expect("z");
                        let spec = node("FusedConvNhwc", act, params)
                            .attr("x_nhwc", AttrValue::Int(xl as i64))
                            .attr("y_nhwc", AttrValue::Int(yl as i64));
                        // W given per call, and constant (regrouped at load).
                        for ((inputs, expect), constant) in [
                            (vec![Some(&tx), Some(&tw), bias], &want),
                            (vec![Some(&tx), Some(&tw), bias, Some(&zv)], &want_z),
                        ]
                        .into_iter()
                        .flat_map(|run| [(run.clone(), false), (run, true)])
                        {
                            let spec = if constant {
                                spec.clone().constant(1)
                            } else {
                                spec.clone()
                            };
                            let got = run_kernel_opt(conv_factory, &spec, &inputs, Some(blas()))
                                .expect("channels-last");
                            assert_eq!(got[0].shape(), &yshape[..]);
                            let expect = layout(expect);
                            for (i, (g, e)) in got[0]
                                .to_vec::<f32>()
                                .expect("f32")
                                .iter()
                                .zip(&expect)
                                .enumerate()
                            {
                                assert!(
                                    g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
                                    "{:?} w {:?} x_nhwc {xl} y_nhwc {yl} act '{act}' bias {with_bias} z {} epilogues {epilogues} planes {planes} avx2 {avx2} constant {constant} at {i}: {g} vs {e}",
                                    case.x, case.w, inputs.len() == 4
                                );
                            }
                        }
                    }
                }
            }
            depthwise::PLANES_ONLY.with(|f| f.set(false));
            super::super::direct::TEST_AVX2.set(false);
        }
    }

    /// Windows from a hostile model (dilations and pads of 2^20 and more, an empty image) on
    /// the channels-last paths that read X in place or store pixel by pixel: each call
    /// returns (a result or an error); the plain window computes.
    #[test]
    fn channels_last_paths_survive_hostile_windows() {
        // (c, m, group, x_nhwc): a first layer writing channels-last, a depthwise layer
        // reading and writing it; each with the best loops and the AVX2 ones (see
        // `direct::TEST_AVX2`; the same where the CPU has no AVX-512).
        for ((c, m, group, x_nhwc), avx2) in [
            (3usize, 4usize, 1usize, false),
            (16, 16, 16, true),
            (20, 4, 1, true),
        ]
        .into_iter()
        .flat_map(|case| [(case, false), (case, true)])
        {
            super::super::direct::TEST_AVX2.set(avx2);
            let w = HostTensor::from_vec(&[m, c / group, 3, 3], &vec![1.0f32; m * (c / group) * 9])
                .expect("w");
            for (h, wd) in [(5usize, 6usize), (0, 4)] {
                let shape = if x_nhwc { [1, h, wd, c] } else { [1, c, h, wd] };
                let x = HostTensor::from_vec(&shape, &vec![2.0f32; h * wd * c]).expect("x");
                for (dil, pad) in [
                    (1i64 << 20, 0i64),
                    (1, 1 << 20),
                    (1 << 40, 1 << 41),
                    (1, 0),
                    (1, 2),
                ] {
                    let node = NodeSpec::onnx("FusedConvNhwc", 1)
                        .domain("opreg")
                        .attr("group", AttrValue::Int(group as i64))
                        .attr("dilations", AttrValue::Ints(vec![dil, 1]))
                        .attr("pads", AttrValue::Ints(vec![pad; 4]))
                        .attr("x_nhwc", AttrValue::Int(x_nhwc as i64))
                        .attr("y_nhwc", AttrValue::Int(1));
                    let r = run_kernel_opt(
                        conv_factory,
                        &node,
                        &[Some(&x), Some(&w)],
                        Some(Box::new(NaiveBlas)),
                    );
                    if let Err(e) = &r {
                        // A clear refusal, not a caught panic.
                        assert!(!e.to_string().contains("panic"), "{c} {dil} {pad} {h}: {e}");
                    }
                    if (dil, pad, h) == (1, 0, 5) {
                        let y = r.expect("plain window");
                        assert_eq!(y[0].shape(), &[1, 3, 4, m]);
                        // Each 3x3 window sums 2 over its 9 taps and c / group channels.
                        let want = 18.0 * (c / group) as f32;
                        assert!(y[0]
                            .to_vec::<f32>()
                            .expect("f32")
                            .iter()
                            .all(|&v| v == want));
                    }
                }
            }
        }
        super::super::direct::TEST_AVX2.set(false);
    }

    /// What the channels-last kernel does not compute is refused by name, not computed wrong.
    #[test]
    fn channels_last_refuses_what_it_does_not_compute() {
        let run = |xs: &[usize], ws: &[usize], group: i64, z: Option<&[usize]>| {
            let x = HostTensor::from_vec(xs, &data(xs.iter().product(), 1)).expect("x");
            let w = HostTensor::from_vec(ws, &data(ws.iter().product(), 2)).expect("w");
            let zt = z.map(|s| HostTensor::from_vec(s, &data(s.iter().product(), 3)).expect("z"));
            let mut inputs = vec![Some(&x), Some(&w)];
            if let Some(zt) = &zt {
                inputs.extend([None, Some(zt)]);
            }
            let spec = NodeSpec::onnx("FusedConvNhwc", 1)
                .domain("opreg")
                .attr("group", AttrValue::Int(group));
            run_kernel_opt(conv_factory, &spec, &inputs, Some(Box::new(NaiveBlas)))
                .err()
                .map(|e| e.to_string())
        };
        // A grouped convolution that is not depthwise, a 1-D one, W of the wrong channel
        // count, a Z that would broadcast. (A 3x3 one of one group computes.)
        let e = run(&[1, 4, 4, 4], &[4, 2, 3, 3], 2, None).expect("grouped refused");
        assert!(e.contains("only 1x1"), "{e}");
        assert!(run(&[1, 4, 4, 2], &[3, 2, 3, 3], 1, None).is_none());
        let e = run(&[1, 4, 2], &[3, 2, 1], 1, None).expect("1-D refused");
        assert!(e.contains("4-D"), "{e}");
        let e = run(&[1, 4, 4, 2], &[3, 5, 1, 1], 1, None).expect("channels refused");
        assert!(e.contains("does not fit"), "{e}");
        // A strided 1x1 layer with hostile strides reads one pixel per image, no overflow.
        let x = HostTensor::from_vec(&[2, 3, 5, 4], &data(120, 1)).expect("x");
        let w = HostTensor::from_vec(&[6, 4, 1, 1], &data(24, 2)).expect("w");
        let spec = NodeSpec::onnx("FusedConvNhwc", 1)
            .domain("opreg")
            .attr("strides", AttrValue::Ints(vec![1 << 40, 1 << 62]));
        let y = run_kernel_opt(
            conv_factory,
            &spec,
            &[Some(&x), Some(&w)],
            Some(Box::new(NaiveBlas)),
        )
        .expect("strided 1x1");
        assert_eq!(y[0].shape(), &[2, 1, 1, 6]);
        let e = run(&[1, 4, 4, 2], &[3, 2, 1, 1], 1, Some(&[1, 1, 1, 3])).expect("Z refused");
        assert!(e.contains("does not broadcast"), "{e}");
        assert!(run(&[1, 4, 4, 2], &[3, 2, 1, 1], 1, Some(&[1, 4, 4, 3])).is_none());
    }
}
