//! Conv: im2col per group, then one gemm per batch and group through the BLAS backend;
//! depthwise and the other 2-D convolutions with windows past 1x1 (a CNN's first layer and
//! the 3x3 layers of its body) directly ([`depthwise`], [`direct`]).

mod channels_last;
mod depthwise;
mod direct;
mod nhwc;
mod stem;

use super::{
    activation::Activation,
    at_least_one, blas, conv_bias,
    matmul::{gemm_f32, has_bf16_gemm, BF16_TYPES},
    optional, pool, Disjoint, Geometry, WindowAttrs,
};
use crate::util::{
    broadcast_shapes, broadcast_strides, product_sat, required, row_major_strides, walk_offsets,
    TaskScratch,
};
use opreg_sdk::alloc::{checked_numel, try_vec, try_with_capacity};
use opreg_sdk::half::{bf16, f16};
use opreg_sdk::prelude::*;
use opreg_sdk::PackedB;
use std::sync::Arc;

#[derive(Clone)]
struct Conv {
    window: WindowAttrs,
    group: usize,
    activation: Activation,
    /// Constant weights of a one-group Conv, packed once at load: as the left operand of
    /// `Y = W cols` ([`Packed::Left`]), or as the right operand of the pixels-by-channels
    /// product `Y^T = cols^T W^T` for layers with few pixels ([`Packed::Right`]).
    packed: Option<Packed>,
    /// Constant weights of a layer [`stem`] or [`direct`] computes, regrouped for it at load
    /// ([`stem::pack`], [`direct::pack`]); then `packed` is not built.
    direct: Option<Direct>,
    /// Which of X and Y are channels-last (`opreg::FusedConvNhwc`, see [`nhwc`]).
    layouts: Layouts,
    /// Constant bf16 weights of a one-group Conv packed once at load as the left operand of
    /// the BLAS's bf16 product ([`Conv::run_bf16`]).
    bf16_left: Option<Arc<PackedB>>,
}

/// Which of a convolution's X and Y (and Z, which has Y's layout) are channels-last
/// (`[N, H, W, C]`) instead of NCHW.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Layouts {
    pub(super) x_nhwc: bool,
    pub(super) y_nhwc: bool,
}

impl Layouts {
    /// Both NCHW: ONNX's Conv.
    fn nchw(self) -> bool {
        !self.x_nhwc && !self.y_nhwc
    }
}

/// Which module's regrouping [`Conv::direct`] holds.
#[derive(Clone)]
enum Direct {
    Stem(Arc<Vec<f32>>),
    Channels(Arc<Vec<f32>>),
    /// A depthwise layer's weights as one row of channels per tap ([`depthwise::pack`]).
    Depthwise(Arc<Vec<f32>>),
}

/// How [`Conv::packed`] holds the weights.
#[derive(Clone)]
enum Packed {
    /// `W` (`m x k`) as a packed A ([`GemmArgs::PACKED_A`]).
    Left(Arc<PackedB>),
    /// `W^T` (`k x m`) as a packed B.
    Right(Arc<PackedB>),
}

/// Layers of at most this many output pixels, and at least as many output channels, compute
/// `Y^T = cols^T W^T` (pixels x channels, C stored column-major, so Y stays NCHW) with `W^T`
/// packed as the right operand: there the weights outweigh the pixels and the pixels fill
/// the kernel's row tiles better than its 32-column ones (ResNet-50's last stage, 49 pixels
/// and 512-2048 channels: its 1x1 layers 4.1 ms in all against 5.0 with `W` on the left, 2
/// threads). Elsewhere `Y = W cols` with `W` packed as the left operand stores C row by row,
/// faster: with every layer of no more pixels than channels swapped (the earlier rule),
/// SqueezeNet's classifier (169 pixels, 1000 channels) took 0.70-0.76 ms against 0.62 left,
/// ResNet-50's 196-pixel 1x1 layers 7.3 against 6.8 ms.
const SWAP_MAX_PIXELS: usize = 64;

/// Runs `image(copy, b, y_b)` for every image `b` of a batch of `n`, one task per image, where
/// `y_b` is image `b`'s `out_len` values of `y` and `copy` is `copy_len` floats of task
/// scratch (reused as left: `image` writes what it reads). The direct kernels take a batch of
/// at least one image per thread so: one parallel loop per layer instead of a copy and a
/// computation per image, each a hand-off between the threads.
fn per_image_tasks(
    ctx: &KernelContext<'_>,
    n: usize,
    (y, out_len): (&mut [f32], usize),
    copy_len: usize,
    image: impl Fn(&mut [f32], usize, &Disjoint<f32>) -> Result<(), PluginError> + Sync,
) -> Result<bool, PluginError> {
    if y.len() < n.saturating_mul(out_len) {
        return Err(PluginError::internal(
            "Conv: the output is shorter than its images",
        ));
    }
    let yd = Disjoint::new(y);
    let copies = TaskScratch::<f32>::new(ctx, copy_len);
    ctx.parallel_for(n, 1, |range| {
        let mut copy = copies.take()?;
        for b in range {
            // SAFETY: each image's output is written by the one task holding it (checked
            // inside y above).
            let yb = Disjoint::new(unsafe { yd.part(b * out_len, out_len) });
            image(&mut copy, b, &yb)?;
        }
        Ok(())
    })?;
    Ok(true)
}

/// The direct kernels' check of their operands against `n` images of `image` values, `m`
/// filters of `depth` weights and output planes of `plane` values: X, W, Y, the bias and a
/// fused sum (of Y's shape) at least as long as their shapes say.
fn operands_fit(
    (x, w, y): (&[f32], &[f32], &[f32]),
    bias: Option<&[f32]>,
    z: Option<&[f32]>,
    (n, image): (usize, usize),
    (m, depth): (usize, usize),
    plane: usize,
) -> Result<(), PluginError> {
    if x.len() < checked_numel(&[n, image])?
        || w.len() < checked_numel(&[m, depth])?
        || y.len() < checked_numel(&[n, m, plane])?
        || bias.is_some_and(|b| b.len() < m)
        || z.is_some_and(|z| z.len() < y.len())
    {
        return Err(PluginError::invalid(
            "Conv: X, W, B or Z is shorter than its shape",
        ));
    }
    Ok(())
}

/// Whether a layer of `pixels` output pixels and `m` output channels (per group) runs as the
/// swapped product (see [`SWAP_MAX_PIXELS`]).
fn swapped(pixels: usize, m: usize) -> bool {
    pixels <= SWAP_MAX_PIXELS && pixels <= m
}

/// Packs a constant f32 `W` (`m x c/group x k...`) of a one-group Conv with the node's BLAS
/// backend: as the `m x k` left operand when `left` (if the backend packs A), else as the
/// `k x m` right operand `W^T` (column-major args). `None` when W is not constant or the
/// backend does not pre-pack.
fn prepack_weights(node: &NodeInfo<'_>, group: usize, left: bool) -> Option<Packed> {
    let w = node.inputs.get(1)?.constant?;
    if group != 1 || w.dtype != DType::F32 || w.shape().len() < 3 {
        return None;
    }
    let (&m, rest) = w.shape().split_first()?;
    let rows = rest.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let blas = node.blas()?;
    let ctx = node.context.as_ref()?;
    if left {
        let args = weights_left_args(
            m,
            1,
            rows,
            w.data.cast(),
            std::ptr::null(),
            std::ptr::null_mut(),
        );
        if !blas.supports(&args) {
            return None;
        }
        return blas
            .pack_b(ctx, &args)
            .ok()
            .map(|p| Packed::Left(Arc::new(p)));
    }
    let args = pixels_by_channels_args(
        1,
        m,
        rows,
        std::ptr::null(),
        w.data.cast(),
        std::ptr::null_mut(),
    );
    blas.pack_b(ctx, &args)
        .ok()
        .map(|p| Packed::Right(Arc::new(p)))
}

/// Row-major gemm arguments of `Y (m x p) = W (m x k) cols (k x p)` with `W` taken from a
/// packed A ([`GemmArgs::PACKED_A`]).
fn weights_left_args(
    m: usize,
    p: usize,
    k: usize,
    w: *const f32,
    cols: *const f32,
    y: *mut f32,
) -> GemmArgs {
    let mut g = GemmArgs::new(GemmTypes::F32, m, p, k);
    g.flags = GemmArgs::PACKED_A;
    g.a = w.cast();
    g.lda = k.max(1);
    g.b = cols.cast();
    g.ldb = p.max(1);
    g.c = y.cast();
    g.ldc = p.max(1);
    g
}

/// Column-major gemm arguments of `Y^T (p x m) = cols^T (p x k) W^T (k x m)` over the
/// row-major `cols` (`k x p`), `W` (`m x k`) and `Y` (`m x p`) as they lie in memory.
fn pixels_by_channels_args(
    p: usize,
    m: usize,
    k: usize,
    cols: *const f32,
    w: *const f32,
    y: *mut f32,
) -> GemmArgs {
    let mut g = GemmArgs::new(GemmTypes::F32, p, m, k);
    g.layout = Layout::COL_MAJOR;
    g.a = cols.cast();
    g.lda = p.max(1);
    g.b = w.cast();
    g.ldb = k.max(1);
    g.c = y.cast();
    g.ldc = p.max(1);
    g
}

/// Sets the bias (one per output channel: per row of C when the weights are the `left`
/// operand, per column of the transposed product) and the activation of a product's gemm
/// arguments.
fn with_epilogue(args: &mut GemmArgs, left: bool, bias: Option<&[f32]>, code: Epilogue) {
    args.epilogue = code;
    if let Some(b) = bias {
        args.bias = b.as_ptr().cast();
        if left {
            args.flags |= GemmArgs::BIAS_PER_ROW;
        }
    }
}

fn conv_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Conv::from_node(node)?))
}

/// `opreg::FusedConvMaxPool`: a 2-D f32 `FusedConv` (no Z) whose output only a MaxPool (no
/// Indices) reads, the pool's attributes carried with a `pool_` prefix (the graph pass
/// `conv-pool`). A first layer that [`stem`] computes pools its rows as they are computed
/// ([`stem::run_pooled`]); any other computes the convolution whole into scratch and pools it
/// as MaxPool does. The same values as the two nodes, bit for bit.
struct ConvMaxPool {
    conv: Conv,
    pool: WindowAttrs,
}

fn conv_max_pool_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let pool = WindowAttrs::from_node_prefixed(node, "pool_")?;
    if pool.kernel_shape.as_ref().is_none_or(|k| k.len() != 2) {
        return Err(PluginError::invalid(
            "FusedConvMaxPool: attribute 'pool_kernel_shape' (2 values) is required",
        ));
    }
    Ok(Box::new(ConvMaxPool {
        conv: Conv::from_node(node)?,
        pool,
    }))
}

impl Kernel for ConvMaxPool {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "FusedConvMaxPool";
        let [xv, wv] = required(OP, inputs, ["X", "W"])?;
        let (xs, ws) = (xv.shape(), wv.shape());
        let (&[n, c, _, _], &[m, cg, _, _]) = (xs, ws) else {
            return Err(PluginError::invalid(format!(
                "{OP}: X {xs:?} and W {ws:?} must have rank 4"
            )));
        };
        if optional(inputs, 3).is_some() {
            return Err(PluginError::invalid(format!("{OP}: takes no Z")));
        }
        let group = self.conv.group;
        if cg.checked_mul(group) != Some(c) || m % group != 0 {
            return Err(PluginError::invalid(format!(
                "{OP}: W {ws:?} does not fit X {xs:?} with group {group}"
            )));
        }
        let bias = optional(inputs, 2).copied();
        if let Some(v) = [Some(xv), Some(wv), bias]
            .into_iter()
            .flatten()
            .find(|v| v.dtype != DType::F32)
        {
            return Err(PluginError::unimplemented(format!(
                "{OP} is implemented for f32 only, got {}",
                v.dtype
            )));
        }
        let g = self.conv.window.resolve("Conv", &xs[2..], Some(&ws[2..]))?;
        let (oh, ow) = (g.out[0], g.out[1]);
        let gp = self.pool.resolve("MaxPool", &g.out, None)?;
        let y = ctx.output_slice_to_overwrite::<f32>(0, &[n, m, gp.out[0], gp.out[1]])?;
        if y.is_empty() {
            return Ok(());
        }
        let (x, w) = (xv.as_slice::<f32>()?, wv.as_slice::<f32>()?);
        let bias = conv_bias(OP, inputs, m)?;
        let act = self.conv.activation;
        if group == 1 && stem::applies(xs, &g, group) {
            let rows = pool::MaxRows::new(&gp, (oh, ow))?;
            if stem::run_pooled(
                ctx,
                xs,
                &g,
                m,
                (x, w, self.conv.stem_packing()),
                bias,
                act,
                (&rows, (gp.out[0], gp.out[1])),
                y,
            )? {
                return Ok(());
            }
        }
        let conv_shape = [n, m, oh, ow];
        let whole = ctx.scratch_reused::<f32>(checked_numel(&conv_shape)?)?;
        self.conv
            .run(ctx, xs, &g, m, x, w, bias, Sum::None, act, whole)?;
        pool::max_pool_f32(ctx, (whole, &conv_shape), &gp, y)
    }
}

impl Conv {
    fn from_node(node: &NodeInfo<'_>) -> Result<Self, PluginError> {
        let group = at_least_one(node, "Conv", "group", 1)?;
        let window = WindowAttrs::from_node(node)?;
        let layouts = if node.op_type == "FusedConvNhwc" {
            Layouts {
                x_nhwc: node.int_or("x_nhwc", 1)? != 0,
                y_nhwc: node.int_or("y_nhwc", 1)? != 0,
            }
        } else {
            Layouts::default()
        };
        // Weights regrouped for [`stem`] or [`direct`] where one takes the layer (the direct
        // kernel in either layout); else one packing, for the orientation the gemm will use: the
        // right operand where the input's extents are known at load and it has few pixels per
        // channel, else the left (with the right as the fallback for a backend that does not
        // pack A). Channels-last layers: the right operand (their products are pixels by
        // channels, see [`nhwc`]), the left for a narrow NCHW output.
        let direct = direct_weights(node, &window, group, layouts)?;
        let packed = if direct.is_some() {
            None
        } else if !layouts.nchw() {
            let narrow = node
                .inputs
                .get(1)
                .and_then(|w| w.constant)
                .and_then(|w| w.shape().first().copied())
                .is_some_and(|m| m < nhwc::LEFT_BELOW);
            prepack_weights(node, group, !layouts.y_nhwc && narrow)
        } else {
            match pixels_and_channels(node, &window) {
                Some((p, m)) if swapped(p, m) => prepack_weights(node, group, false),
                _ => prepack_weights(node, group, true)
                    .or_else(|| prepack_weights(node, group, false)),
            }
        };
        Ok(Conv {
            window,
            group,
            activation: if node.domain == "opreg" {
                Activation::from_node(node, "FusedConv")?
            } else {
                Activation::None
            },
            packed,
            direct,
            layouts,
            bf16_left: prepack_bf16_weights(node, group),
        })
    }
}

/// Packs constant bf16 weights of a one-group Conv as the left operand (`W`, `m x k`) of the
/// BLAS's bf16 product, where the backend has it; `None` otherwise (each run packs them).
fn prepack_bf16_weights(node: &NodeInfo<'_>, group: usize) -> Option<Arc<PackedB>> {
    let w = node.inputs.get(1)?.constant?;
    if group != 1 || w.dtype != DType::BF16 || w.shape().len() < 3 {
        return None;
    }
    let (&m, rest) = w.shape().split_first()?;
    let depth = rest.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let mut args = GemmArgs::new(BF16_TYPES, m, 1, depth);
    (args.flags, args.a, args.lda) = (GemmArgs::PACKED_A, w.data.cast(), depth.max(1));
    let blas = node.blas()?;
    if !blas.supports(&args) {
        return None;
    }
    blas.pack_b(node.context.as_ref()?, &args)
        .ok()
        .map(Arc::new)
}

/// The constant f32 weights regrouped for [`stem`] or [`direct`] where the input's shape is
/// known at load and one of them takes the layer (only [`direct`] where a layout is
/// channels-last); `None` otherwise (then the gemm's packing is built, and a layer either
/// takes after all regroups its weights per call).
fn direct_weights(
    node: &NodeInfo<'_>,
    window: &WindowAttrs,
    group: usize,
    layouts: Layouts,
) -> Result<Option<Direct>, PluginError> {
    let Some(w) = node.inputs.get(1).and_then(|i| i.constant) else {
        return Ok(None);
    };
    let Some(x) = node.inputs.first().and_then(|i| i.shape) else {
        return Ok(None);
    };
    // The batch may be dynamic; channels and spatial extents decide.
    let Some(mut xs) = std::iter::once(Some(1))
        .chain(x.iter().skip(1).map(|&d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
    else {
        return Ok(None);
    };
    if layouts.x_nhwc && xs.len() == 4 {
        // `[N, H, W, C]` as the NCHW shape the geometry is resolved from.
        xs = vec![xs[0], xs[3], xs[1], xs[2]];
    }
    if w.dtype != DType::F32 || w.shape().len() != 4 || xs.len() != 4 {
        return Ok(None);
    }
    // Only the channels-last loops (AVX-512, AVX2) read the regrouped weights.
    if depthwise::applies(&xs, group, w.shape()[0])
        && w.shape()[1] == 1
        && direct::Isa::detect().is_some()
    {
        // Regrouped per call, the taps' rows took a scattered pass over W on every run
        // (MobileNetV2's 17 layers: 64k scattered stores per image).
        let taps = w.shape()[2].saturating_mul(w.shape()[3]);
        let packed = depthwise::pack(w.as_slice()?, xs[1], taps)?;
        return Ok(Some(Direct::Depthwise(Arc::new(packed))));
    }
    if w.shape()[1] != xs[1] {
        return Ok(None);
    }
    let Ok(g) = window.resolve("Conv", &xs[2..], Some(&w.shape()[2..])) else {
        return Ok(None);
    };
    let m = w.shape()[0];
    let data: &[f32] = w.as_slice()?;
    let kernel = (g.kernel[0], g.kernel[1]);
    // The stem reads NCHW X and writes either layout.
    if !layouts.x_nhwc && stem::applies(&xs, &g, group) && stem::keeps(m, layouts.y_nhwc) {
        return Ok(Some(Direct::Stem(Arc::new(stem::pack(
            data, m, xs[1], kernel,
        )?))));
    }
    if !direct::applies(&xs, &g, group) {
        return Ok(None);
    }
    let packed = direct::pack(data, m, xs[1], kernel)?;
    Ok(Some(Direct::Channels(Arc::new(packed))))
}

/// Output pixels and output channels, when the input's spatial extents and the weights' shape
/// are known at load.
fn pixels_and_channels(node: &NodeInfo<'_>, window: &WindowAttrs) -> Option<(usize, usize)> {
    let x = node.inputs.first()?.shape?;
    let w = node.inputs.get(1)?.constant?;
    let spatial: Vec<usize> = x
        .get(2..)?
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let kernel = w.shape().get(2..)?;
    let g = window.resolve("Conv", &spatial, Some(kernel)).ok()?;
    let pixels = g.out.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    Some((pixels, *w.shape().first()?))
}

/// Unrolls the `channels` planes of `x` (spatial extents `input`) into `col`, a
/// `(channels * prod(kernel)) x prod(out)` matrix. Every element is written (padding taps as
/// zeros), so `col` may hold anything before: it comes from the host's reused scratch.
fn im2col<T: Copy + Default + Send + Sync>(
    ctx: &KernelContext<'_>,
    x: &[T],
    input: &[usize],
    g: &Geometry,
    col: &mut [T],
) -> Result<(), PluginError> {
    // Saturating: with no input channels, W is empty and its kernel extents unbounded.
    let kk = product_sat(&g.kernel);
    let p = product_sat(&g.out);
    if p == 0 || kk == 0 {
        return Ok(());
    }
    let rows_per_chunk = (16 * 1024 / p).max(1);
    ctx.parallel_chunks(col, rows_per_chunk * p, |start, chunk| {
        im2col_rows(x, input, g, start, chunk)
    })
}

/// The im2col rows starting at flat element `start` of the column matrix, into `chunk`
/// (whole rows of `p` elements).
fn im2col_rows<T: Copy + Default>(
    x: &[T],
    input: &[usize],
    g: &Geometry,
    start: usize,
    chunk: &mut [T],
) {
    let s = input.len();
    let kk = product_sat(&g.kernel);
    let p = product_sat(&g.out);
    let plane = product_sat(input);
    let in_strides = row_major_strides(input);
    let last = s - 1;
    let ol = g.out[last];
    let outer = p / ol;
    {
        let mut kid = vec![0usize; s];
        let mut oid = vec![0usize; s];
        for (i, row) in chunk.chunks_mut(p).enumerate() {
            let r = start / p + i;
            let c = r / kk;
            let mut rem = r % kk;
            for d in (0..s).rev() {
                kid[d] = rem % g.kernel[d];
                rem /= g.kernel[d];
            }
            let xc = &x[c * plane..(c + 1) * plane];
            let koff = (kid[last] * g.dilations[last]) as isize - g.pad_begin[last] as isize;
            let st = g.strides[last];
            let width = input[last] as isize;
            oid.fill(0);
            for orow in 0..outer {
                let mut base = 0isize;
                let mut valid = true;
                for d in 0..last {
                    let pos = (oid[d] * g.strides[d] + kid[d] * g.dilations[d]) as isize
                        - g.pad_begin[d] as isize;
                    if pos < 0 || pos >= input[d] as isize {
                        valid = false;
                        break;
                    }
                    base += pos * in_strides[d] as isize;
                }
                let dst = &mut row[orow * ol..(orow + 1) * ol];
                if valid {
                    // Outputs `lo..hi` read inside the row (`o * st + koff` in `0..width`);
                    // the rest are padding.
                    let lo = if koff >= 0 {
                        0
                    } else {
                        koff.unsigned_abs().div_ceil(st).min(ol)
                    };
                    let hi = if width > koff {
                        (width - koff).unsigned_abs().div_ceil(st).clamp(lo, ol)
                    } else {
                        lo
                    };
                    dst[..lo].fill(T::default());
                    dst[hi..].fill(T::default());
                    let first = base + koff + (lo * st) as isize;
                    if st == 1 {
                        let from = first as usize;
                        dst[lo..hi].copy_from_slice(&xc[from..from + (hi - lo)]);
                    } else {
                        for (i, v) in dst[lo..hi].iter_mut().enumerate() {
                            *v = xc[first as usize + i * st];
                        }
                    }
                } else {
                    dst.fill(T::default());
                }
                for d in (0..last).rev() {
                    oid[d] += 1;
                    if oid[d] < g.out[d] {
                        break;
                    }
                    oid[d] = 0;
                }
            }
        }
    }
}

impl Conv {
    /// The weights regrouped at load for [`stem`], if they were.
    fn stem_packing(&self) -> Option<&[f32]> {
        match &self.direct {
            Some(Direct::Stem(p)) => Some(&p[..]),
            _ => None,
        }
    }

    /// The weights regrouped at load for [`direct`], if they were.
    fn direct_packing(&self) -> Option<&[f32]> {
        match &self.direct {
            Some(Direct::Channels(p)) => Some(&p[..]),
            _ => None,
        }
    }

    /// The weights regrouped at load for [`depthwise`], if they were.
    fn depthwise_packing(&self) -> Option<&[f32]> {
        match &self.direct {
            Some(Direct::Depthwise(p)) => Some(&p[..]),
            _ => None,
        }
    }
}

impl Kernel for Conv {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        if !self.layouts.nchw() {
            return self.compute_nhwc(ctx, inputs);
        }
        let [xv, wv] = required("Conv", inputs, ["X", "W"])?;
        let (xs, ws) = (xv.shape(), wv.shape());
        if xs.len() < 3 || ws.len() != xs.len() {
            return Err(PluginError::invalid(format!(
                "Conv: X {xs:?} and W {ws:?} must have the same rank, at least 3"
            )));
        }
        let (n, c) = (xs[0], xs[1]);
        let (m, cg) = (ws[0], ws[1]);
        let group = self.group;
        if cg.checked_mul(group) != Some(c) || m % group != 0 {
            return Err(PluginError::invalid(format!(
                "Conv: W {ws:?} does not fit X {xs:?} with group {group}"
            )));
        }
        let g = self.window.resolve("Conv", &xs[2..], Some(&ws[2..]))?;
        let mut out_shape = vec![n, m];
        out_shape.extend_from_slice(&g.out);
        // FusedConv's sum input (a residual Add fused in by the pass `conv-add`).
        let z = optional(inputs, 3).copied();
        if let Some(v) = [Some(wv), optional(inputs, 2).copied(), z]
            .into_iter()
            .flatten()
            .find(|v| v.dtype != xv.dtype)
        {
            return Err(PluginError::invalid(format!(
                "Conv: X is {} but W, B or Z is {}",
                xv.dtype, v.dtype
            )));
        }
        // A Z of the output's own shape is added in the pass that adds the bias; any other
        // shape takes the widened path, which broadcasts as Add does.
        let z_same = z.filter(|v| v.shape() == out_shape.as_slice());
        match xv.dtype {
            DType::F32 if z.is_none() || z_same.is_some() => {
                let y = ctx.output_slice_to_overwrite::<f32>(0, &out_shape)?;
                // The host may place Y over Z (the alias registered with FusedConv, when
                // nothing reads Z after this node): Z's elements are then Y's, and no slice
                // of Z may live while Y is written (see `Sum::InY`).
                let sum = match z_same {
                    Some(v) if std::ptr::eq(v.data, y.as_ptr().cast()) => Sum::InY,
                    z => Sum::from(z.map(|v| v.as_slice()).transpose()?),
                };
                self.run(
                    ctx,
                    xs,
                    &g,
                    m,
                    xv.as_slice()?,
                    wv.as_slice()?,
                    conv_bias("Conv", inputs, m)?,
                    sum,
                    self.activation,
                    y,
                )
            }
            DType::F32 => self.run_widened(ctx, inputs, xs, &g, m, &out_shape, |v: f32| v, |v| v),
            // Half types: widened to f32 for the BLAS gemm, the result rounded back.
            DType::F16 => self.run_widened(
                ctx,
                inputs,
                xs,
                &g,
                m,
                &out_shape,
                f16::to_f32,
                f16::from_f32,
            ),
            DType::BF16
                if (z.is_none() || z_same.is_some())
                    && self.bf16_products(
                        ctx,
                        (c, m),
                        &g,
                        (optional(inputs, 2).is_some(), z_same.is_some()),
                    ) =>
            {
                let y = ctx.output_slice_to_overwrite::<bf16>(0, &out_shape)?;
                // Z (of Y's shape) is added by the product's `beta`: Y starts as Z. The host
                // may have placed Y over Z already (see `Sum::InY`); else it is copied in.
                let sum = match z_same {
                    Some(v) if std::ptr::eq(v.data, y.as_ptr().cast()) => true,
                    Some(v) => {
                        y.copy_from_slice(v.as_slice::<bf16>()?);
                        true
                    }
                    None => false,
                };
                let bias = conv_bias::<bf16>("Conv", inputs, m)?
                    .map(|b| {
                        let mut v = try_with_capacity(b.len())?;
                        v.extend(b.iter().map(|x| x.to_f32()));
                        Ok::<Vec<f32>, PluginError>(v)
                    })
                    .transpose()?;
                self.run_bf16(
                    ctx,
                    xs,
                    &g,
                    m,
                    (xv.as_slice()?, wv.as_slice()?),
                    bias,
                    sum,
                    y,
                )
            }
            DType::BF16 => self.run_widened(
                ctx,
                inputs,
                xs,
                &g,
                m,
                &out_shape,
                bf16::to_f32,
                bf16::from_f32,
            ),
            other => Err(PluginError::unimplemented(format!(
                "Conv is not implemented for {other}"
            ))),
        }
    }
}

impl Conv {
    /// Whether a bf16 convolution of `c` input and `m` output channels runs as bf16 products
    /// in the BLAS ([`Self::run_bf16`]): the backend has the bf16 flavour with what the layer
    /// needs (a bias per row, the activation, Z accumulated into Y), and each group's product is a matrix product worth the name (a
    /// depthwise layer's 1 x 9 rows are left to the widened path's depthwise kernel).
    fn bf16_products(
        &self,
        ctx: &KernelContext<'_>,
        (c, m): (usize, usize),
        g: &Geometry,
        (bias, sum): (bool, bool),
    ) -> bool {
        let Some(act) = self.activation.blas_epilogue() else {
            return false;
        };
        let (cg, mg) = (c / self.group.max(1), m / self.group.max(1));
        let depth = cg.saturating_mul(product_sat(&g.kernel));
        let mut probe = GemmArgs::new(BF16_TYPES, 1, 1, 1);
        if bias {
            probe.flags = GemmArgs::BIAS_PER_ROW;
        }
        probe.epilogue = act;
        if sum {
            probe.beta = 1.0;
        }
        mg >= 8
            && depth >= 16
            && has_bf16_gemm(ctx)
            && ctx.blas().is_some_and(|b| b.supports(&probe))
    }

    /// The convolution as bf16 products in the BLAS, per image and group `Y = W * cols`
    /// (f32 sums; the bias and activation in its tiles; Y rounded to bf16 once), with the
    /// columns gathered in bf16 (none for a 1x1 layer with unit strides and no padding: X is
    /// its own column matrix). `quant-mixed`'s `lowered=bf16` layers: half the bytes of f32
    /// and, with AVX-512 BF16, twice its multiply-adds per instruction.
    #[allow(clippy::too_many_arguments)]
    fn run_bf16(
        &self,
        ctx: &KernelContext<'_>,
        xs: &[usize],
        g: &Geometry,
        m: usize,
        (x, w): (&[bf16], &[bf16]),
        bias: Option<Vec<f32>>,
        sum: bool,
        y: &mut [bf16],
    ) -> Result<(), PluginError> {
        let (n, c, group) = (xs[0], xs[1], self.group);
        let (cg, mg) = (c / group, m / group);
        let kk = product_sat(&g.kernel);
        let depth = cg.saturating_mul(kk);
        let p = product_sat(&g.out);
        let plane = product_sat(&xs[2..]);
        let too_short = |what: &str| {
            PluginError::invalid(format!("Conv: {what} is too short for X {xs:?} and W"))
        };
        if x.len() < n.saturating_mul(c).saturating_mul(plane) || w.len() < m.saturating_mul(depth)
        {
            return Err(too_short("X or W"));
        }
        if y.is_empty() {
            return Ok(());
        }
        let direct = kk == 1
            && p == plane
            && g.strides.iter().all(|&s| s == 1)
            && g.pad_begin.iter().chain(&g.pad_end).all(|&v| v == 0);
        let mut cols = if direct {
            Vec::new()
        } else {
            try_vec(depth.saturating_mul(p), bf16::ZERO)?
        };
        let blas = blas(ctx, "Conv")?;
        let act = self.activation.blas_epilogue().unwrap_or(Epilogue::NONE);
        for img in 0..n {
            for gi in 0..group {
                let first = img * c + gi * cg;
                let xg = &x[first * plane..(first + cg) * plane];
                let b: &[bf16] = if direct {
                    xg
                } else {
                    im2col(ctx, xg, &xs[2..], g, &mut cols)?;
                    &cols
                };
                let rows = img * m + gi * mg;
                let yg = &mut y[rows * p..(rows + mg) * p];
                let mut args = GemmArgs::new(BF16_TYPES, mg, p, depth);
                (args.a, args.lda) = (w[gi * mg * depth..].as_ptr().cast(), depth.max(1));
                (args.b, args.ldb) = (b.as_ptr().cast(), p);
                (args.c, args.ldc) = (yg.as_mut_ptr().cast(), p);
                args.epilogue = act;
                if sum {
                    args.beta = 1.0;
                }
                if let Some(bias) = &bias {
                    args.flags = GemmArgs::BIAS_PER_ROW;
                    args.bias = bias[gi * mg..].as_ptr().cast();
                }
                match self.bf16_left.as_deref().filter(|p| {
                    let info = p.info();
                    group == 1 && (info.k, info.n) == (depth, mg)
                }) {
                    Some(p) => {
                        args.flags |= GemmArgs::PACKED_A;
                        blas.gemm_packed(ctx, &args, p)?;
                    }
                    None => blas.gemm(ctx, &args)?,
                }
            }
        }
        Ok(())
    }

    /// The convolution computed in f32 from operands widened from `T`, the result rounded
    /// back once (after the bias, Z and the activation); also the path of a Z that
    /// broadcasts to or from the convolution's shape.
    #[allow(clippy::too_many_arguments)]
    fn run_widened<T: Element>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
        xs: &[usize],
        g: &Geometry,
        m: usize,
        out_shape: &[usize],
        load: fn(T) -> f32,
        store: fn(f32) -> T,
    ) -> Result<(), PluginError> {
        // Widened copies are as large as the inputs, which come from the request: fallible.
        let wide = |v: TensorView<'_>| -> Result<Vec<f32>, PluginError> {
            let src = v.as_slice::<T>()?;
            let mut out = try_with_capacity(src.len())?;
            out.extend(src.iter().map(|&x| load(x)));
            Ok(out)
        };
        let [x, w] = required("Conv", inputs, ["X", "W"])?;
        let (x, w) = (wide(x)?, wide(w)?);
        let bias: Option<Vec<f32>> =
            conv_bias::<T>("Conv", inputs, m)?.map(|b| b.iter().map(|&v| load(v)).collect());
        let z = optional(inputs, 3)
            .map(|v| Ok::<_, PluginError>((v.shape(), wide(*v)?)))
            .transpose()?;
        let broadcast = z.as_ref().filter(|(zs, _)| *zs != out_shape);
        let final_shape = match broadcast {
            Some((zs, _)) => broadcast_shapes(&[out_shape, zs])?,
            None => out_shape.to_vec(),
        };
        // The output first (the host refuses sizes past its limit), then the f32 result it is
        // rounded from: padding makes both arbitrarily larger than X, so neither may abort.
        let out = ctx.output_slice::<T>(0, &final_shape)?;
        let mut y = try_vec(checked_numel(out_shape)?, 0.0f32)?;
        // A same-shape Z and the activation go into the epilogue; a Z of another shape is
        // added after, broadcast, and the activation with it.
        let (same_z, act) = match broadcast {
            None => (z.as_ref().map(|(_, v)| v.as_slice()), self.activation),
            Some(_) => (None, Activation::None),
        };
        let sum = Sum::from(same_z);
        self.run(ctx, xs, g, m, &x, &w, bias.as_deref(), sum, act, &mut y)?;
        let Some((zs, zv)) = broadcast else {
            out.iter_mut().zip(&y).for_each(|(o, &v)| *o = store(v));
            return Ok(());
        };
        // Y + Z with both broadcast to the output's shape, then the activation.
        let mut sum = try_vec(out.len(), 0.0f32)?;
        for (src, shape) in [(&y, out_shape), (zv, *zs)] {
            let strides = broadcast_strides(shape, &final_shape);
            let mut dst = sum.iter_mut();
            walk_offsets(&final_shape, &strides, 0, out.len(), |o| {
                if let (Some(d), Some(&v)) = (dst.next(), src.get(o)) {
                    *d += v;
                }
            });
        }
        let act = self.activation;
        out.iter_mut()
            .zip(&sum)
            .for_each(|(o, &v)| *o = store(act.apply(v)));
        Ok(())
    }

    /// The weights packed at load for a `mg x rows` by `rows x p` product, and whether they are
    /// its left operand; `None`: the product runs as a plain gemm.
    fn packed_for(&self, mg: usize, p: usize, rows: usize) -> Option<(&PackedB, bool)> {
        let matches = |pk: &PackedB| {
            let info = pk.info();
            self.group == 1 && info.k == rows && info.n == mg
        };
        match &self.packed {
            Some(Packed::Left(pk)) if matches(pk) => Some((pk, true)),
            Some(Packed::Right(pk)) if matches(pk) && swapped(p, mg) => Some((pk, false)),
            _ => None,
        }
    }

    /// The BLAS epilogue that applies `act` after the bias in [`product`](Self::product)'s
    /// tiles, when the products of this size run on packed weights and the backend supports
    /// it: then no pass over the output follows (`finish` read and wrote all of Y again).
    /// `None`: `finish` applies them.
    fn blas_epilogue(
        &self,
        ctx: &KernelContext<'_>,
        (mg, p, rows, beta): (usize, usize, usize, f32),
        bias: Option<&[f32]>,
        act: Activation,
    ) -> Option<Epilogue> {
        // The BLAS formulas are `Activation::apply`'s (same bits); other activations stay here.
        let code = act.blas_epilogue()?;
        let (_, left) = self.packed_for(mg, p, rows)?;
        let (w, x, mut y) = ([0f32; 1], [0f32; 1], [0f32; 1]);
        let mut args = if left {
            weights_left_args(mg, p, rows, w.as_ptr(), x.as_ptr(), y.as_mut_ptr())
        } else {
            pixels_by_channels_args(p, mg, rows, x.as_ptr(), w.as_ptr(), y.as_mut_ptr())
        };
        args.beta = beta;
        with_epilogue(&mut args, left, bias, code);
        blas(ctx, "Conv").ok()?.supports(&args).then_some(code)
    }

    /// `yg (mg x p) = w (mg x rows) * rhs (rows x p)` for one image and group: with the
    /// weights packed at load, as the left operand, or as `Y^T = rhs^T W^T` where the layer
    /// has few pixels per channel (see [`SWAP_MAX_PIXELS`]); else as a plain gemm.
    /// With `epi` (what [`blas_epilogue`](Self::blas_epilogue) answered for this size), the
    /// BLAS adds the group's bias and applies the activation too.
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        ctx: &KernelContext<'_>,
        mg: usize,
        p: usize,
        rows: usize,
        w: &[f32],
        rhs: &[f32],
        yg: &mut [f32],
        beta: f32,
        epi: Option<(Option<&[f32]>, Epilogue)>,
    ) -> Result<(), PluginError> {
        let fits = |len: usize, a: usize, b: usize| a.checked_mul(b).is_some_and(|e| len >= e);
        let Some((pk, left)) = self.packed_for(mg, p, rows) else {
            if epi.is_some() {
                return Err(PluginError::internal(
                    "Conv: a BLAS epilogue for a product without packed weights",
                ));
            }
            return gemm_f32(
                ctx, "Conv", false, false, mg, p, rows, 1.0, w, rhs, beta, yg, None,
            );
        };
        if p == 0 || mg == 0 {
            return Ok(());
        }
        if !fits(rhs.len(), rows, p) || !fits(yg.len(), mg, p) {
            return Err(PluginError::internal(format!(
                "Conv: operands too short for {mg}x{rows} * {rows}x{p}"
            )));
        }
        let mut args = if left {
            weights_left_args(mg, p, rows, w.as_ptr(), rhs.as_ptr(), yg.as_mut_ptr())
        } else {
            pixels_by_channels_args(p, mg, rows, rhs.as_ptr(), w.as_ptr(), yg.as_mut_ptr())
        };
        args.beta = beta;
        if let Some((bias, code)) = epi {
            if bias.is_some_and(|b| b.len() != mg) {
                return Err(PluginError::internal(format!(
                    "Conv: a group's bias of {:?} values for {mg} channels",
                    bias.map(<[f32]>::len)
                )));
            }
            with_epilogue(&mut args, left, bias, code);
        }
        blas(ctx, "Conv")?.gemm_packed(ctx, &args, pk)
    }

    /// The convolution in f32 into `y` (of the output's shape), plus the sum Z (of the same
    /// shape) when given, then `act`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        ctx: &KernelContext<'_>,
        xs: &[usize],
        g: &Geometry,
        m: usize,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        sum: Sum<'_>,
        act: Activation,
        y: &mut [f32],
    ) -> Result<(), PluginError> {
        let (n, c) = (xs[0], xs[1]);
        let group = self.group;
        let cg = c / group;
        if y.is_empty() {
            return Ok(());
        }
        // Z already in Y: the products add themselves to it (beta 1: Y's cache lines are
        // read once, for the sum, instead of Z's and then Y's for ownership). The direct
        // kernels read Z where they write Y, so they take a copy of it; one of them declining
        // leaves the product with that copy.
        let own_kernel = || {
            depthwise::applies(xs, group, m)
                || stem::applies(xs, g, group)
                || direct::applies(xs, g, group)
        };
        let copied;
        let (z, beta) = match sum {
            Sum::None => (None, 0.0),
            Sum::Apart(z) => (Some(z), 0.0),
            Sum::InY if own_kernel() => {
                copied = ctx.scratch_reused::<f32>(y.len())?;
                copied.copy_from_slice(y);
                (Some(&*copied), 0.0)
            }
            Sum::InY => (None, 1.0),
        };
        // Non-empty y: the output's extents multiply without overflow.
        let p: usize = g.out.iter().product();
        // Saturating: with no input channels, X and W are empty and their spatial and kernel
        // extents unbounded (then no column is filled).
        let plane = product_sat(&xs[2..]);
        let kk = product_sat(&g.kernel);
        let rows = cg * kk;
        let mg = m / group;
        let direct = g.kernel.iter().all(|&k| k == 1)
            && g.strides.iter().all(|&s| s == 1)
            && g.pad_begin.iter().chain(&g.pad_end).all(|&p| p == 0);
        if depthwise::applies(xs, group, m) {
            let nchw = Layouts::default();
            if z.is_none() {
                return depthwise::run(
                    ctx,
                    xs,
                    g,
                    (x, w, self.depthwise_packing()),
                    bias,
                    act,
                    y,
                    nchw,
                );
            }
            // Z is added after the taps (as the Add it replaces would), then the activation.
            depthwise::run(
                ctx,
                xs,
                g,
                (x, w, self.depthwise_packing()),
                bias,
                Activation::None,
                y,
                nchw,
            )?;
            return finish(ctx, y, None, z, act, m, p);
        }
        if stem::applies(xs, g, group)
            && stem::run(
                ctx,
                xs,
                g,
                m,
                x,
                w,
                self.stem_packing(),
                bias,
                z,
                act,
                (&mut *y, false),
            )?
        {
            return Ok(());
        }
        if direct::applies(xs, g, group)
            && direct::run(
                ctx,
                xs,
                g,
                m,
                x,
                w,
                self.direct_packing(),
                bias,
                z,
                act,
                (&mut *y, Layouts::default()),
            )?
        {
            return Ok(());
        }
        // The bias and activation in the BLAS's tiles where it can (never with Z: the sum's
        // rounding order is the unfused graph's, see `finish`).
        // (A bias of another length than m, which `conv_bias` refuses, stays with `finish`.)
        let code = if z.is_none() && bias.is_none_or(|b| b.len() == m) {
            self.blas_epilogue(ctx, (mg, p, rows, beta), bias.map(|b| &b[..mg]), act)
        } else {
            None
        };
        let epi_of =
            |gi: usize| code.map(|c| (bias.and_then(|b| b.get(gi * mg..(gi + 1) * mg)), c));
        let finish = |y: &mut [f32]| match code {
            Some(_) => Ok(()),
            None => finish(ctx, y, bias, z, act, m, p),
        };
        if n * group >= ctx.num_threads().max(2) {
            // Enough images (x groups) to keep every thread busy: one task per (image, group),
            // each with its own column buffer (none for a 1x1 layer, which reads x in place),
            // instead of a parallel im2col and gemm per image. A 1x1 layer's product per image
            // is often too small for the BLAS to split (SqueezeNet's 13x13 48->192 at batch 8:
            // the second thread added nothing).
            let yd = Disjoint::new(y);
            let col_len = if direct {
                0
            } else {
                checked_numel(&[rows, p])?
            };
            let cols = TaskScratch::<f32>::new(ctx, col_len);
            ctx.parallel_for(n * group, 1, |range| {
                let mut col = if direct { None } else { Some(cols.take()?) };
                for t in range {
                    let (b, gi) = (t / group, t % group);
                    let xg = &x[(b * c + gi * cg) * plane..(b * c + (gi + 1) * cg) * plane];
                    let rhs: &[f32] = match col.as_deref_mut() {
                        None => xg,
                        Some(col) => {
                            im2col_rows(xg, &xs[2..], g, 0, col);
                            col
                        }
                    };
                    let at = (b * m + gi * mg) * p;
                    // SAFETY: each (image, group) writes its own disjoint block of y.
                    let yg = unsafe { yd.part(at, mg * p) };
                    let wg = &w[gi * mg * rows..(gi + 1) * mg * rows];
                    self.product(ctx, mg, p, rows, wg, rhs, yg, beta, epi_of(gi))?;
                }
                Ok(())
            })?;
            return finish(y);
        }
        let col = if direct {
            &mut [][..]
        } else {
            ctx.scratch_reused::<f32>(checked_numel(&[rows, p])?)?
        };
        for b in 0..n {
            for gi in 0..group {
                let xg = &x[(b * c + gi * cg) * plane..(b * c + (gi + 1) * cg) * plane];
                let rhs: &[f32] = if direct {
                    xg
                } else {
                    im2col(ctx, xg, &xs[2..], g, col)?;
                    col
                };
                let yg = &mut y[(b * m + gi * mg) * p..(b * m + (gi + 1) * mg) * p];
                let wg = &w[gi * mg * rows..(gi + 1) * mg * rows];
                self.product(ctx, mg, p, rows, wg, rhs, yg, beta, epi_of(gi))?;
            }
        }
        finish(y)
    }
}

/// Adds the per-output-channel bias and `z` (of `y`'s shape) to every plane of `y` and applies
/// the activation, in one pass over the output. The sums are rounded in the order of the
/// unfused graph (Conv's bias, then the Add), so fusing changes no bit.
fn finish(
    ctx: &KernelContext<'_>,
    y: &mut [f32],
    bias: Option<&[f32]>,
    z: Option<&[f32]>,
    act: Activation,
    m: usize,
    p: usize,
) -> Result<(), PluginError> {
    if bias.is_none() && z.is_none() && act == Activation::None {
        return Ok(());
    }
    let p = p.max(1);
    ctx.parallel_chunks(y, p.max(1024).div_ceil(p) * p, |start, chunk| {
        for (i, plane) in chunk.chunks_mut(p).enumerate() {
            let at = start + i * p;
            let bv = bias.map_or(0.0, |b| b[(at / p) % m]);
            let zp = z.and_then(|z| z.get(at..at + plane.len()));
            finish_plane(plane, bv, zp, act);
        }
    })
}

/// `$each!(|v| f(v))` with `f` the activation `$act` computes (as [`Activation::apply`]
/// does), chosen once so that the loop `$each` writes vectorizes: [`finish_plane`]'s and
/// [`finish_row`]'s loops.
macro_rules! per_activation {
    ($act:expr, $each:ident) => {
        match $act {
            Activation::None => $each!(|v| v),
            Activation::Relu => $each!(|v| v.max(0.0)),
            Activation::Clip(lo, hi) => $each!(|v| Activation::Clip(lo, hi).apply(v)),
            Activation::LeakyRelu(a) => $each!(|v| if v < 0.0 { a * v } else { v }),
            Activation::SiLU => $each!(|v| Activation::SiLU.apply(v)),
            Activation::Gelu => $each!(|v| Activation::Gelu.apply(v)),
        }
    };
}

crate::simd::simd_fn! {
    /// `v = act((v + bv) + z)` over one plane (`z` absent: `act(v + bv)`), with the activation
    /// chosen once outside the loop so that each loop vectorizes (SiLU's sigmoid included),
    /// compiled for AVX-512 and AVX2 too. Each arm computes what [`Activation::apply`] does.
    fn finish_plane(plane: &mut [f32], bv: f32, z: Option<&[f32]>, act: Activation) {
        macro_rules! each {
            (|$v:ident| $e:expr) => {
                // Plain loops: a `for_each` may be compiled out of line, outside the
                // instruction set this function is compiled for (see blas-cpu's epilogue).
                match z {
                    Some(zp) => {
                        for (o, &zv) in plane.iter_mut().zip(zp) {
                            let $v = (*o + bv) + zv;
                            *o = $e;
                        }
                    }
                    None => {
                        for o in plane.iter_mut() {
                            let $v = *o + bv;
                            *o = $e;
                        }
                    }
                }
            };
        }
        per_activation!(act, each);
    }
}

crate::simd::simd_fn! {
    /// `v = act((v + bias[j]) + z[j])` along one channels-last row of `row.len()` channels
    /// (`bias` absent: 0, as [`finish_plane`] adds; `z` absent: `act(v + bias[j])`), the
    /// activation chosen once outside the loop so that the loop vectorizes. The per-element
    /// loop it replaces divided each index by the channel count and took as long as the 1x1
    /// convolution itself on MobileNetV2's residual projections (measured).
    fn finish_row(row: &mut [f32], bias: Option<&[f32]>, z: Option<&[f32]>, act: Activation) {
        macro_rules! each {
            (|$v:ident| $e:expr) => {
                match (bias, z) {
                    (Some(b), Some(zr)) => {
                        for ((o, &bv), &zv) in row.iter_mut().zip(b).zip(zr) {
                            let $v = (*o + bv) + zv;
                            *o = $e;
                        }
                    }
                    (None, Some(zr)) => {
                        for (o, &zv) in row.iter_mut().zip(zr) {
                            let $v = (*o + 0.0) + zv;
                            *o = $e;
                        }
                    }
                    (Some(b), None) => {
                        for (o, &bv) in row.iter_mut().zip(b) {
                            let $v = *o + bv;
                            *o = $e;
                        }
                    }
                    (None, None) => {
                        for o in row.iter_mut() {
                            let $v = *o + 0.0;
                            *o = $e;
                        }
                    }
                }
            };
        }
        per_activation!(act, each);
    }
}

/// A convolution's residual sum Z: none, a tensor apart, or already in Y (the host placed Y
/// over Z's memory, the alias FusedConv and FusedConvNhwc register: Z's elements are read
/// through Y, never through a slice of Z, which would alias Y).
#[derive(Clone, Copy)]
pub(super) enum Sum<'a> {
    None,
    Apart(&'a [f32]),
    InY,
}

impl<'a> From<Option<&'a [f32]>> for Sum<'a> {
    fn from(z: Option<&'a [f32]>) -> Self {
        z.map_or(Sum::None, Sum::Apart)
    }
}

pub fn register(r: &mut Registrar) {
    use opreg_sdk::dtype::names::*;
    // bf16 from opset 22.
    for (since, end, types) in [
        (1, 10, &[F32, F16][..]),
        (11, 21, &[F32, F16]),
        (22, OPEN_END, &[F32, F16, BF16]),
    ] {
        r.kernel(
            KernelDesc::onnx("Conv", since, end)
                .constraint("T", types)
                .inputs(&["T", "T", "T"])
                .outputs(&["T"]),
            conv_factory,
        );
    }
    // Conv with its activation (the graph pass `conv-activation`), or a residual Add and the
    // activation after it (`conv-add`: the optional fourth input Z, ONNX Runtime's `Sum`)
    // fused in.
    r.kernel(
        KernelDesc::new("opreg", "FusedConv", 1, OPEN_END)
            .constraint("T", &[F32, F16, BF16])
            .inputs(&["T", "T", "T", "T"])
            .outputs(&["T"])
            // Y over Z where the plan allows (see `Sum::InY`).
            .alias(3, 0),
        conv_factory,
    );
    // FusedConv and the MaxPool reading it (the graph pass `conv-pool`; see
    // [`ConvMaxPool`]).
    r.kernel(
        KernelDesc::new("opreg", "FusedConvMaxPool", 1, OPEN_END)
            .constraint("T", &[F32])
            .inputs(&["T", "T", "T"])
            .outputs(&["T"]),
        conv_max_pool_factory,
    );
    // FusedConv with a channels-last X and/or Y (the graph pass `nhwc-conv`; see [`nhwc`]),
    // offered only where it pays: where the depthwise and direct kernels have a loop of
    // their own (AVX-512, or AVX2 with FMA: `direct::Isa`). Without one each channels-last
    // operand was turned around the NCHW loops: on an AVX2 CPU before its loops (Zen 3, one
    // thread) the pass made MobileNetV2 45.8 ms against 27.8 without it. With them, the same
    // CPU, interleaved, best of 3-4 rounds: MobileNetV2 11.1-11.9 against 13.1-13.3 ms,
    // ResNet-18 44.9 against 45.8, ResNet-50 100.4-103.2 against 102.8-103.1 (the depthwise
    // layers no longer turn their image both ways).
    // Without the kernel the pass does not run (it fuses only into kernels that exist).
    if direct::Isa::detect().is_none() {
        return;
    }
    r.kernel(
        KernelDesc::new("opreg", "FusedConvNhwc", 1, OPEN_END)
            .constraint("T", &[F32])
            .inputs(&["T", "T", "T", "T"])
            .outputs(&["T"])
            // Y over Z where the plan allows (see `nhwc::compute_nhwc`).
            .alias(3, 0),
        conv_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testblas::NaiveBlas;

    #[test]
    fn fused_activations_match_their_operators() {
        assert_eq!(Activation::Relu.apply(-2.0), 0.0);
        assert_eq!(Activation::Clip(0.0, 6.0).apply(7.5), 6.0);
        assert_eq!(Activation::Clip(0.0, 6.0).apply(-1.0), 0.0);
        assert!(
            Activation::Clip(0.0, 6.0).apply(f32::NAN).is_nan(),
            "Clip keeps NaN"
        );
        assert_eq!(Activation::LeakyRelu(0.1).apply(-2.0), -0.2);
        assert_eq!(Activation::None.apply(-3.0), -3.0);
        // FusedConv with an activation runs Conv and the activation on the same data.
        let x = HostTensor::from_vec(&[1, 1, 2, 2], &[1.0f32, -2.0, 3.0, -4.0]).expect("x");
        let w = HostTensor::from_vec(&[1, 1, 1, 1], &[2.0f32]).expect("w");
        let node = NodeSpec::onnx("FusedConv", 1)
            .domain("opreg")
            .attr("activation", AttrValue::String("LeakyRelu".into()))
            .attr("activation_params", AttrValue::Floats(vec![0.5]));
        let out =
            run_kernel(conv_factory, &node, &[&x, &w], Some(Box::new(NaiveBlas))).expect("run");
        assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![2.0, -2.0, 6.0, -4.0]);
        // The depthwise path applies it too (ReLU6, as MobileNetV2 fuses it), after the bias.
        let x = HostTensor::from_vec(&[1, 2, 1, 2], &[1.0f32, -2.0, 3.0, 4.0]).expect("x");
        let w = HostTensor::from_vec(&[2, 1, 1, 1], &[2.0f32, 3.0]).expect("w");
        let b = HostTensor::from_vec(&[2], &[0.5f32, -1.0]).expect("b");
        let node = NodeSpec::onnx("FusedConv", 1)
            .domain("opreg")
            .attr("group", AttrValue::Int(2))
            .attr("activation", AttrValue::String("Clip".into()))
            .attr("activation_params", AttrValue::Floats(vec![0.0, 6.0]));
        let out = run_kernel(
            conv_factory,
            &node,
            &[&x, &w, &b],
            Some(Box::new(NaiveBlas)),
        )
        .expect("run");
        assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![2.5, 0.0, 6.0, 6.0]);
        let bad = NodeSpec::onnx("FusedConv", 1)
            .domain("opreg")
            .attr("activation", AttrValue::String("Clip".into()));
        let e = run_kernel(conv_factory, &bad, &[&x, &w], Some(Box::new(NaiveBlas)))
            .expect_err("Clip without bounds");
        assert!(e.message.contains("activation_params"), "{e:?}");
    }
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, run_kernel_opt, NodeSpec},
    };

    #[test]
    fn a_fused_residual_sum_equals_conv_then_add_then_the_activation_bit_for_bit() {
        // (x shape, w shape, group, pads, strides, with bias): the per-image gemm path (two
        // images), the one-image im2col path, a direct 1x1, a depthwise layer, no bias, a
        // first layer with pixels in the lanes ([`stem`]: rows of 35 outputs).
        type Case = ([usize; 4], [usize; 4], usize, i64, i64, bool);
        let cases: [Case; 6] = [
            ([1, 3, 9, 70], [5, 3, 3, 3], 1, 1, 2, true),
            ([2, 3, 6, 5], [4, 3, 3, 3], 1, 1, 1, true),
            ([1, 4, 7, 7], [6, 4, 3, 3], 1, 1, 2, true),
            ([1, 5, 4, 4], [8, 5, 1, 1], 1, 0, 1, true),
            ([1, 6, 9, 8], [6, 1, 3, 3], 6, 1, 1, true),
            ([1, 3, 5, 5], [2, 3, 3, 3], 1, 0, 1, false),
        ];
        for (i, (xs, ws, group, pad, stride, with_bias)) in cases.into_iter().enumerate() {
            let x = HostTensor::from_vec(&xs, &data(xs.iter().product(), 1)).expect("x");
            let w = HostTensor::from_vec(&ws, &data(ws.iter().product(), 2)).expect("w");
            let b = HostTensor::from_vec(&[ws[0]], &data(ws[0], 3)).expect("b");
            let conv = NodeSpec::onnx("Conv", 11)
                .attr("group", AttrValue::Int(group as i64))
                .attr("pads", ints(&[pad as usize; 4]))
                .attr("strides", ints(&[stride as usize; 2]));
            let bias = with_bias.then_some(&b);
            let plain = run_kernel_opt(
                conv_factory,
                &conv,
                &[Some(&x), Some(&w), bias],
                Some(Box::new(NaiveBlas)),
            )
            .expect("conv");
            let y = plain[0].to_vec::<f32>().unwrap();
            let z = data(y.len(), 4);
            let zt = HostTensor::from_vec(plain[0].shape(), &z).expect("z");
            for (act, params, f) in [
                ("", vec![], Activation::None),
                ("Relu", vec![], Activation::Relu),
                ("Clip", vec![-0.5, 0.5], Activation::Clip(-0.5, 0.5)),
            ] {
                let mut node = NodeSpec::onnx("FusedConv", 1)
                    .domain("opreg")
                    .attr("group", AttrValue::Int(group as i64))
                    .attr("pads", ints(&[pad as usize; 4]))
                    .attr("strides", ints(&[stride as usize; 2]));
                if !act.is_empty() {
                    node = node.attr("activation", AttrValue::String(act.into()));
                }
                if !params.is_empty() {
                    node = node.attr("activation_params", AttrValue::Floats(params));
                }
                let fused = run_kernel_opt(
                    conv_factory,
                    &node,
                    &[Some(&x), Some(&w), bias, Some(&zt)],
                    Some(Box::new(NaiveBlas)),
                )
                .expect("fused");
                let want: Vec<u32> = y
                    .iter()
                    .zip(&z)
                    .map(|(&a, &b)| f.apply(a + b).to_bits())
                    .collect();
                let got: Vec<u32> = fused[0]
                    .to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                assert_eq!(got, want, "case {i} activation '{act}'");
            }
        }
    }

    #[test]
    fn a_fused_sum_of_another_shape_broadcasts_as_add_does() {
        // y [1, 2, 1, 2] (1x1 conv of a 1x2 image): Z [2, 1, 1] broadcasts up to it, and
        // Z [1, 2, 3, 1] broadcasts y up to [1, 2, 3, 2].
        let x = HostTensor::from_vec(&[1, 1, 1, 2], &[1.0f32, -2.0]).expect("x");
        let w = HostTensor::from_vec(&[2, 1, 1, 1], &[2.0f32, 3.0]).expect("w");
        let node = NodeSpec::onnx("FusedConv", 1)
            .domain("opreg")
            .attr("activation", AttrValue::String("Relu".into()));
        let run = |z: &HostTensor| {
            let out = run_kernel_opt(
                conv_factory,
                &node,
                &[Some(&x), Some(&w), None, Some(z)],
                Some(Box::new(NaiveBlas)),
            )
            .expect("run");
            (out[0].shape().to_vec(), out[0].to_vec::<f32>().unwrap())
        };
        // y = [[2, -4], [3, -6]].
        let z = HostTensor::from_vec(&[2, 1, 1], &[1.0f32, 10.0]).expect("z");
        assert_eq!(run(&z), (vec![1, 2, 1, 2], vec![3.0, 0.0, 13.0, 4.0]));
        let z = HostTensor::from_vec(&[1, 2, 3, 1], &[0.0f32, 1.0, 5.0, 0.0, 2.0, 7.0]).expect("z");
        assert_eq!(
            run(&z),
            (
                vec![1, 2, 3, 2],
                vec![2.0, 0.0, 3.0, 0.0, 7.0, 1.0, 3.0, 0.0, 5.0, 0.0, 10.0, 1.0]
            )
        );
        // Shapes that do not broadcast, and a Z of another type, are refused.
        let z = HostTensor::from_vec(&[3], &[0.0f32; 3]).expect("z");
        let e = run_kernel_opt(
            conv_factory,
            &node,
            &[Some(&x), Some(&w), None, Some(&z)],
            Some(Box::new(NaiveBlas)),
        )
        .expect_err("no broadcast");
        assert!(e.message.contains("broadcast"), "{e:?}");
        let z = HostTensor::from_vec(&[1, 2, 1, 2], &[0i32; 4]).expect("z");
        let e = run_kernel_opt(
            conv_factory,
            &node,
            &[Some(&x), Some(&w), None, Some(&z)],
            Some(Box::new(NaiveBlas)),
        )
        .expect_err("wrong type");
        assert!(e.message.contains("Z"), "{e:?}");
    }

    #[test]
    fn bf16_layers_run_as_bf16_products_where_they_are_matrix_products() {
        use crate::nn::testblas::NaiveBf16Blas;
        use std::sync::{atomic::Ordering, Arc};
        // (x shape, w shape, group, pad, stride, products, with Z): im2col 3x3 with padding
        // and stride, a direct 1x1 with and without a residual Z, two groups of 8 x 18; then a
        // depthwise layer (widened: 1 x 9 products).
        type Case = ([usize; 4], [usize; 4], usize, usize, usize, bool, bool);
        let cases: [Case; 5] = [
            ([2, 3, 7, 6], [8, 3, 3, 3], 1, 1, 2, true, false),
            ([1, 16, 5, 4], [12, 16, 1, 1], 1, 0, 1, true, false),
            ([1, 16, 5, 4], [12, 16, 1, 1], 1, 0, 1, true, true),
            ([1, 4, 5, 5], [16, 2, 3, 3], 2, 1, 1, true, false),
            ([1, 8, 5, 5], [8, 1, 3, 3], 8, 1, 1, false, false),
        ];
        for (xs, ws, group, pad, stride, products, with_z) in cases {
            // Values of a few bits: the bf16 and f32 paths agree exactly before rounding.
            let vals = |len: usize, seed: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| ((i * 7 + seed) % 9) as f32 * 0.25 - 1.0)
                    .collect()
            };
            let (x, w) = (vals(xs.iter().product(), 1), vals(ws.iter().product(), 2));
            let b = vals(ws[0], 3);
            let h = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
            let extent = |d: usize| (xs[d] + 2 * pad - ws[d]) / stride + 1;
            let out = [xs[0], ws[0], extent(2), extent(3)];
            let z = vals(out.iter().product(), 4);
            let tz = HostTensor::from_vec(&out, &z).expect("z");
            let tz16 = HostTensor::from_vec(&out, &h(&z)).expect("z");
            let node = NodeSpec::onnx("FusedConv", 1)
                .domain("opreg")
                .attr("group", AttrValue::Int(group as i64))
                .attr("pads", AttrValue::Ints(vec![pad as i64; 4]))
                .attr("strides", AttrValue::Ints(vec![stride as i64; 2]))
                .attr("activation", AttrValue::String("Relu".into()));
            let (tx, tw, tb) = (
                HostTensor::from_vec(&xs, &x).expect("x"),
                HostTensor::from_vec(&ws, &w).expect("w"),
                HostTensor::from_vec(&[ws[0]], &b).expect("b"),
            );
            let mut inputs = vec![&tx, &tw, &tb];
            if with_z {
                inputs.push(&tz);
            }
            let want =
                run_kernel(conv_factory, &node, &inputs, Some(Box::new(NaiveBlas))).expect("f32");
            let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (tx, tw, tb) = (
                HostTensor::from_vec(&xs, &h(&x)).expect("x"),
                HostTensor::from_vec(&ws, &h(&w)).expect("w"),
                HostTensor::from_vec(&[ws[0]], &h(&b)).expect("b"),
            );
            let mut inputs = vec![&tx, &tw, &tb];
            if with_z {
                inputs.push(&tz16);
            }
            let got = run_kernel(
                conv_factory,
                &node,
                &inputs,
                Some(Box::new(NaiveBf16Blas(calls.clone()))),
            )
            .expect("bf16");
            assert_eq!(got[0].shape(), want[0].shape());
            assert_eq!(
                got[0].to_vec::<bf16>().expect("bf16"),
                h(&want[0].to_vec::<f32>().expect("f32")),
                "{xs:?} {ws:?}"
            );
            let per_image = if products { group * xs[0] } else { 0 };
            assert_eq!(calls.load(Ordering::Relaxed), per_image, "{xs:?} {ws:?}");
        }
    }

    #[test]
    fn a_half_precision_fused_sum_is_rounded_once() {
        let x = HostTensor::from_vec(&[1, 1, 2, 2], &[1.5f32, -2.0, 3.25, 0.5].map(f16::from_f32))
            .expect("x");
        let w = HostTensor::from_vec(&[1, 1, 1, 1], &[f16::from_f32(3.0)]).expect("w");
        let z = HostTensor::from_vec(
            &[1, 1, 2, 2],
            &[0.5f32, 1.0, -20.0, 0.25].map(f16::from_f32),
        )
        .expect("z");
        let node = NodeSpec::onnx("FusedConv", 1)
            .domain("opreg")
            .attr("activation", AttrValue::String("Relu".into()));
        let out = run_kernel_opt(
            conv_factory,
            &node,
            &[Some(&x), Some(&w), None, Some(&z)],
            Some(Box::new(NaiveBlas)),
        )
        .expect("run");
        let got: Vec<f32> = out[0]
            .to_vec::<f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        assert_eq!(got, vec![5.0, 0.0, 0.0, 1.75]);
    }

    /// Direct 3-D convolution; lower ranks embed with unit extents.
    #[allow(clippy::too_many_arguments)]
    fn naive_conv3(
        x: &[f32],
        xs: [usize; 5],
        w: &[f32],
        ws: [usize; 5],
        bias: Option<&[f32]>,
        group: usize,
        strides: [usize; 3],
        dil: [usize; 3],
        pads: [usize; 6],
    ) -> (Vec<usize>, Vec<f32>) {
        let [n, c, d, h, wd] = xs;
        let [m, cg, kd, kh, kw] = ws;
        let od = (d + pads[0] + pads[3] - ((kd - 1) * dil[0] + 1)) / strides[0] + 1;
        let oh = (h + pads[1] + pads[4] - ((kh - 1) * dil[1] + 1)) / strides[1] + 1;
        let ow = (wd + pads[2] + pads[5] - ((kw - 1) * dil[2] + 1)) / strides[2] + 1;
        let mg = m / group;
        let mut y = vec![0.0f32; n * m * od * oh * ow];
        for b in 0..n {
            for oc in 0..m {
                let gi = oc / mg;
                for z in 0..od {
                    for yy in 0..oh {
                        for xx in 0..ow {
                            let mut acc = bias.map_or(0.0, |bb| bb[oc]);
                            for ic in 0..cg {
                                let ch = gi * cg + ic;
                                for a in 0..kd {
                                    for e in 0..kh {
                                        for f in 0..kw {
                                            let pz = (z * strides[0] + a * dil[0]) as isize
                                                - pads[0] as isize;
                                            let py = (yy * strides[1] + e * dil[1]) as isize
                                                - pads[1] as isize;
                                            let px = (xx * strides[2] + f * dil[2]) as isize
                                                - pads[2] as isize;
                                            if pz < 0
                                                || py < 0
                                                || px < 0
                                                || pz >= d as isize
                                                || py >= h as isize
                                                || px >= wd as isize
                                            {
                                                continue;
                                            }
                                            let xi = (((b * c + ch) * d + pz as usize) * h
                                                + py as usize)
                                                * wd
                                                + px as usize;
                                            let wi = (((oc * cg + ic) * kd + a) * kh + e) * kw + f;
                                            acc += x[xi] * w[wi];
                                        }
                                    }
                                }
                            }
                            y[(((b * m + oc) * od + z) * oh + yy) * ow + xx] = acc;
                        }
                    }
                }
            }
        }
        (vec![n, m, od, oh, ow], y)
    }

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 37 + seed * 11) % 23) as f32 - 11.0) / 7.0)
            .collect()
    }

    fn ints(v: &[usize]) -> AttrValue {
        AttrValue::Ints(v.iter().map(|&x| x as i64).collect())
    }

    fn close(a: &[f32], b: &[f32]) {
        crate::util::testing::assert_close(a, b, 1e-4);
    }

    /// Runs Conv on a rank-(2+s) problem given as its 3-D embedding (leading unit dims).
    #[allow(clippy::too_many_arguments)]
    fn check(
        s: usize,
        xs: [usize; 5],
        ws: [usize; 5],
        group: usize,
        strides: [usize; 3],
        dil: [usize; 3],
        pads: [usize; 6],
        with_bias: bool,
    ) {
        let x = data(xs.iter().product(), 1);
        let w = data(ws.iter().product(), 2);
        let bias = data(ws[0], 3);
        let (ys, want) = naive_conv3(
            &x,
            xs,
            &w,
            ws,
            with_bias.then_some(&bias[..]),
            group,
            strides,
            dil,
            pads,
        );
        let keep = 3 - s;
        let shape = |v: [usize; 5]| {
            let mut out = v[..2].to_vec();
            out.extend_from_slice(&v[2 + keep..]);
            out
        };
        let tx = HostTensor::from_vec(&shape(xs), &x).expect("x");
        let tw = HostTensor::from_vec(&shape(ws), &w).expect("w");
        let tb = HostTensor::from_vec(&[ws[0]], &bias).expect("b");
        let mut p = pads[keep..3].to_vec();
        p.extend_from_slice(&pads[3 + keep..]);
        let node = NodeSpec::onnx("Conv", 11)
            .attr("group", AttrValue::Int(group as i64))
            .attr("strides", ints(&strides[keep..]))
            .attr("dilations", ints(&dil[keep..]))
            .attr("pads", ints(&p));
        let mut inputs = vec![&tx, &tw];
        if with_bias {
            inputs.push(&tb);
        }
        let out = run_kernel(conv_factory, &node, &inputs, Some(Box::new(NaiveBlas))).expect("run");
        let mut want_shape = ys[..2].to_vec();
        want_shape.extend_from_slice(&ys[2 + keep..]);
        assert_eq!(out[0].shape(), &want_shape[..]);
        close(&out[0].to_vec::<f32>().expect("f32"), &want);
    }

    #[test]
    fn conv2d_matches_direct_loops() {
        // Plain 3x3, padded.
        check(
            2,
            [2, 3, 1, 5, 6],
            [4, 3, 1, 3, 3],
            1,
            [1, 1, 1],
            [1, 1, 1],
            [0, 1, 1, 0, 1, 1],
            true,
        );
        // Strided, dilated, asymmetric pads, groups.
        check(
            2,
            [1, 4, 1, 7, 8],
            [6, 2, 1, 3, 2],
            2,
            [1, 2, 3],
            [1, 2, 1],
            [0, 1, 0, 0, 2, 1],
            true,
        );
        // Depthwise.
        check(
            2,
            [1, 3, 1, 5, 5],
            [3, 1, 1, 3, 3],
            3,
            [1, 2, 2],
            [1, 1, 1],
            [0, 1, 1, 0, 1, 1],
            false,
        );
        // 1x1 stride 1, unpadded: the direct gemm path (two images of two groups: one task
        // per image and group, x read in place).
        check(
            2,
            [2, 4, 1, 3, 5],
            [6, 2, 1, 1, 1],
            2,
            [1, 1, 1],
            [1, 1, 1],
            [0; 6],
            true,
        );
        // 1x1 with stride goes through im2col.
        check(
            2,
            [1, 2, 1, 5, 5],
            [3, 2, 1, 1, 1],
            1,
            [1, 2, 2],
            [1, 1, 1],
            [0; 6],
            false,
        );
    }

    #[test]
    fn shallow_convolutions_match_direct_loops_in_every_geometry() {
        // (x [n, c, h, w], output channels, kernel, strides, dilations, pads [top, left,
        // bottom, right], bias): the first layers of MobileNetV2 and ResNet in small, output
        // widths around the 16-pixel runs, channel counts around the 8-channel blocks,
        // dilation, asymmetric and kernel-wide pads, two images.
        type Case = (
            [usize; 4],
            usize,
            [usize; 2],
            [usize; 2],
            [usize; 2],
            [usize; 4],
            bool,
        );
        let cases: [Case; 9] = [
            (
                [1, 3, 20, 20],
                32,
                [3, 3],
                [2, 2],
                [1, 1],
                [1, 1, 1, 1],
                true,
            ),
            (
                [2, 3, 23, 21],
                5,
                [7, 7],
                [2, 2],
                [1, 1],
                [3, 3, 3, 3],
                false,
            ),
            ([1, 1, 5, 16], 8, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], true),
            (
                [1, 2, 6, 17],
                17,
                [3, 3],
                [1, 1],
                [1, 1],
                [0, 1, 2, 1],
                true,
            ),
            ([1, 4, 9, 40], 9, [3, 2], [1, 3], [2, 1], [2, 0, 1, 2], true),
            (
                [2, 3, 4, 33],
                16,
                [1, 1],
                [1, 1],
                [1, 1],
                [0, 0, 0, 0],
                false,
            ),
            ([1, 3, 3, 3], 3, [5, 5], [1, 1], [1, 1], [2, 2, 2, 2], true),
            ([1, 2, 2, 2], 4, [3, 3], [1, 1], [1, 1], [3, 3, 3, 3], true),
            ([1, 3, 8, 1], 8, [3, 1], [2, 1], [1, 1], [1, 0, 1, 0], true),
        ];
        for (k, (xs, m, ks, st, dil, pads, bias)) in cases.into_iter().enumerate() {
            assert_eq!(
                direct::applies(&xs, &geometry(xs, ks, st, dil, pads), 1),
                direct::Isa::detect().is_some() && ks != [1, 1],
                "case {k}"
            );
            let [n, c, h, w] = xs;
            println!("case {k}");
            check(
                2,
                [n, c, 1, h, w],
                [m, c, 1, ks[0], ks[1]],
                1,
                [1, st[0], st[1]],
                [1, dil[0], dil[1]],
                [0, pads[0], pads[1], 0, pads[2], pads[3]],
                bias,
            );
        }
        // The activations it applies in registers (ReLU, Clip) and those it leaves to the
        // pass over each row (SiLU), a fused sum, NaN and -0.0: as Conv, Add and the
        // activation one after the other.
        let xs = [1usize, 3, 9, 19];
        let mut x = data(xs.iter().product(), 5);
        x[7] = f32::NAN;
        let w = data(10 * 3 * 9, 6);
        let b = data(10, 7);
        let tx = HostTensor::from_vec(&xs, &x).expect("x");
        let tw = HostTensor::from_vec(&[10, 3, 3, 3], &w).expect("w");
        let tb = HostTensor::from_vec(&[10], &b).expect("b");
        let conv = |node: NodeSpec, inputs: &[&HostTensor]| {
            run_kernel(conv_factory, &node, inputs, Some(Box::new(NaiveBlas))).expect("run")[0]
                .to_vec::<f32>()
                .expect("f32")
        };
        let plain = NodeSpec::onnx("Conv", 11).attr("pads", ints(&[1, 1, 1, 1]));
        let y = conv(plain.clone(), &[&tx, &tw, &tb]);
        let z: Vec<f32> = (0..y.len()).map(|i| (i % 13) as f32 * 0.25 - 1.5).collect();
        let tz = HostTensor::from_vec(&[1, 10, 9, 19], &z).expect("z");
        for (act, params) in [
            ("Relu", vec![]),
            ("Clip", vec![0.0, 6.0]),
            ("SiLU", vec![]),
            ("", vec![]),
        ] {
            let activation = match act {
                "Relu" => Activation::Relu,
                "Clip" => Activation::Clip(0.0, 6.0),
                "SiLU" => Activation::SiLU,
                _ => Activation::None,
            };
            let fused = NodeSpec::onnx("FusedConv", 1)
                .domain("opreg")
                .attr("pads", ints(&[1, 1, 1, 1]))
                .attr("activation", AttrValue::String(act.into()))
                .attr("activation_params", AttrValue::Floats(params));
            for with_z in [false, true] {
                let mut inputs = vec![&tx, &tw, &tb];
                if with_z {
                    inputs.push(&tz);
                }
                let got = conv(fused.clone(), &inputs);
                let want: Vec<f32> = y
                    .iter()
                    .zip(&z)
                    .map(|(&v, &zv)| activation.apply(if with_z { v + zv } else { v }))
                    .collect();
                assert_eq!(got.len(), want.len());
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
                        "{act} z {with_z} at {i}: {g} vs {e}"
                    );
                }
            }
        }
        // No bias, no activation: the sums themselves.
        let bare = conv(plain, &[&tx, &tw]);
        for ((&v, &bv), i) in bare.iter().zip(&y).zip(0..) {
            let with_bias = v + b[(i / (9 * 19)) % 10];
            assert!(
                with_bias.to_bits() == bv.to_bits() || (bv.is_nan() && with_bias.is_nan()),
                "{i}"
            );
        }
    }

    /// The 2-D geometry of `x` with a `ks` window (pads top, left, bottom, right).
    fn geometry(
        xs: [usize; 4],
        ks: [usize; 2],
        st: [usize; 2],
        dil: [usize; 2],
        pads: [usize; 4],
    ) -> Geometry {
        let out =
            |i: usize| (xs[2 + i] + pads[i] + pads[2 + i] - (ks[i] - 1) * dil[i] - 1) / st[i] + 1;
        Geometry {
            kernel: ks.to_vec(),
            strides: st.to_vec(),
            dilations: dil.to_vec(),
            pad_begin: pads[..2].to_vec(),
            pad_end: pads[2..].to_vec(),
            out: vec![out(0), out(1)],
        }
    }

    /// A 2-D case: (x [n, c, h, w], output channels, kernel, strides, dilations, pads [top,
    /// left, bottom, right]).
    type Case = (
        [usize; 4],
        usize,
        [usize; 2],
        [usize; 2],
        [usize; 2],
        [usize; 4],
    );

    /// A case's X, W and B (from [`data`]) as tensors, the output's shape and what the direct
    /// loops compute.
    struct Reference {
        x: HostTensor,
        w: HostTensor,
        b: HostTensor,
        ys: [usize; 4],
        want: Vec<f32>,
    }

    fn reference((xs, m, ks, st, dil, pads): Case) -> Reference {
        let [n, c, h, wd] = xs;
        let g = geometry(xs, ks, st, dil, pads);
        let x = data(xs.iter().product(), 1);
        let w = data(m * c * ks[0] * ks[1], 2);
        let b = data(m, 3);
        let (_, want) = naive_conv3(
            &x,
            [n, c, 1, h, wd],
            &w,
            [m, c, 1, ks[0], ks[1]],
            Some(&b),
            1,
            [1, st[0], st[1]],
            [1, dil[0], dil[1]],
            [0, pads[0], pads[1], 0, pads[2], pads[3]],
        );
        Reference {
            x: HostTensor::from_vec(&xs, &x).expect("x"),
            w: HostTensor::from_vec(&[m, c, ks[0], ks[1]], &w).expect("w"),
            b: HostTensor::from_vec(&[m], &b).expect("b"),
            ys: [n, m, g.out[0], g.out[1]],
            want,
        }
    }

    #[test]
    fn first_layers_with_pixels_in_lanes_match_direct_loops() {
        // Rows of at least 32 outputs from at most 4 channels, which [`stem`]
        // takes: SqueezeNet's unpadded 3x3/2 (64 channels, 8 blocks), ResNet's 7x7/2 on two
        // images (13 channels: a block of 8 and a part), a grey plane at stride 1, stride 3
        // with dilation and asymmetric pads (three column phases), a 2x2 window, rows of 9
        // registers (tiles 3, 3, 3) and of 5 (3, 2), a last register of 2 pixels; three
        // small grey images (a text recognizer's lines: one task per image).
        let cases: [Case; 9] = [
            ([1, 3, 13, 75], 64, [3, 3], [2, 2], [1, 1], [0, 0, 0, 0]),
            ([2, 3, 16, 70], 13, [7, 7], [2, 2], [1, 1], [3, 3, 3, 3]),
            ([1, 1, 6, 40], 8, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([1, 4, 9, 110], 9, [3, 5], [1, 3], [2, 2], [2, 0, 1, 2]),
            ([1, 2, 6, 64], 20, [2, 2], [2, 2], [1, 1], [0, 1, 1, 0]),
            ([1, 3, 4, 130], 17, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([1, 3, 5, 70], 5, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([1, 3, 5, 34], 8, [3, 3], [1, 1], [1, 1], [0, 0, 0, 0]),
            ([3, 1, 8, 40], 16, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
        ];
        // Each with the best tiles and, where the CPU has AVX-512, the AVX2 ones too (see
        // `direct::TEST_AVX2`).
        for ((k, case), avx2) in cases.into_iter().enumerate().flat_map(|c| {
            let both = crate::simd::has_avx512() && crate::simd::has_avx2_fma();
            [(c, false), (c, true)]
                .into_iter()
                .take(1 + usize::from(both))
        }) {
            direct::TEST_AVX2.set(avx2);
            let (xs, _, ks, st, dil, pads) = case;
            let g = geometry(xs, ks, st, dil, pads);
            let isa = direct::Isa::detect();
            let window = ks[0] * ks[1];
            assert_eq!(
                stem::applies(&xs, &g, 1),
                isa == Some(direct::Isa::Avx512)
                    || (isa.is_some() && window <= stem::AVX2_MAX_WINDOW),
                "case {k}"
            );
            let r = reference(case);
            // Weights given per call, and constant (regrouped at load).
            for constant in [false, true] {
                let mut node = NodeSpec::onnx("Conv", 11)
                    .attr("kernel_shape", ints(&ks))
                    .attr("strides", ints(&st))
                    .attr("dilations", ints(&dil))
                    .attr("pads", ints(&pads));
                if constant {
                    node = node.constant(1);
                }
                // A BLAS for CPUs without AVX-512, where the first layers run as products.
                let blas: Option<Box<dyn Blas>> = Some(Box::new(NaiveBlas));
                let out = run_kernel(conv_factory, &node, &[&r.x, &r.w, &r.b], blas).expect("run");
                assert_eq!(out[0].shape(), &r.ys[..], "case {k}");
                close(&out[0].to_vec::<f32>().expect("f32"), &r.want);
            }
        }
        direct::TEST_AVX2.set(false);
    }

    /// `opreg::FusedConvMaxPool` gives the bits of FusedConv (its ReLU) then MaxPool. First
    /// layers whose pool runs in bands ([`stem::run_pooled`]): SqueezeNet's unpadded 3x3/2
    /// with a ceil-mode 3x3/2 pool, ResNet's padded 7x7/2 and 3x3/2 on two images (13
    /// channels: a block and a part), a grey plane with a 2x2/2 pool (tall enough that a
    /// task's band takes several steps); and layers computed
    /// whole, then pooled: 16 input channels, a 3x3/1 pool (not in bands). X holds NaNs
    /// (a pool keeps a window's first tap when it is NaN); weights per call and constant.
    #[test]
    fn a_fused_max_pool_equals_conv_then_max_pool_bit_for_bit() {
        /// A conv case, the pool's kernel, strides, pads and ceil mode, and whether it runs
        /// in bands.
        type Pooled = (Case, [usize; 2], [usize; 2], [usize; 4], bool, bool);
        let cases: [Pooled; 5] = [
            (
                ([1, 3, 131, 70], 16, [3, 3], [2, 2], [1, 1], [0; 4]),
                [3, 3],
                [2, 2],
                [0; 4],
                true,
                true,
            ),
            (
                ([2, 3, 40, 72], 13, [7, 7], [2, 2], [1, 1], [3; 4]),
                [3, 3],
                [2, 2],
                [1; 4],
                false,
                true,
            ),
            (
                ([1, 1, 100, 64], 8, [3, 3], [1, 1], [1, 1], [1; 4]),
                [2, 2],
                [2, 2],
                [0; 4],
                false,
                true,
            ),
            (
                ([1, 16, 20, 40], 8, [3, 3], [1, 1], [1, 1], [1; 4]),
                [3, 3],
                [2, 2],
                [1; 4],
                false,
                false,
            ),
            (
                ([1, 3, 20, 66], 8, [3, 3], [1, 1], [1, 1], [1; 4]),
                [3, 3],
                [1, 1],
                [1; 4],
                false,
                false,
            ),
        ];
        // Each with the best tiles and, where the CPU has AVX-512, the AVX2 ones too.
        for ((k, (case, pk, ps, pp, ceil, banded)), avx2) in
            cases.into_iter().enumerate().flat_map(|c| {
                let both = crate::simd::has_avx512() && crate::simd::has_avx2_fma();
                [(c, false), (c, true)]
                    .into_iter()
                    .take(1 + usize::from(both))
            })
        {
            direct::TEST_AVX2.set(avx2);
            let (xs, _, ks, st, _, pads) = case;
            let g = geometry(xs, ks, st, [1, 1], pads);
            let pool_attrs = WindowAttrs {
                kernel_shape: Some(pk.iter().map(|&v| v as i64).collect()),
                strides: Some(ps.iter().map(|&v| v as i64).collect()),
                dilations: None,
                pads: Some(pp.iter().map(|&v| v as i64).collect()),
                auto_pad: super::super::AutoPad::NotSet,
                ceil_mode: ceil,
            };
            let gp = pool_attrs.resolve("MaxPool", &g.out, None).expect("pool");
            let isa = direct::Isa::detect();
            let rows = pool::MaxRows::new(&gp, (g.out[0], g.out[1])).expect("rows");
            assert_eq!(
                stem::applies(&xs, &g, 1) && rows.in_bands(),
                banded
                    && (isa == Some(direct::Isa::Avx512)
                        || (isa.is_some() && ks[0] * ks[1] <= stem::AVX2_MAX_WINDOW)),
                "case {k}"
            );
            let r = reference(case);
            let mut x = r.x.to_vec::<f32>().expect("x");
            for i in (5..x.len()).step_by(97) {
                x[i] = f32::NAN;
            }
            let x = HostTensor::from_vec(&xs, &x).expect("x");
            // Constant weights with a ReLU (which turns NaN sums into zeros), weights per
            // call without one (NaN sums reach the pool).
            for constant in [false, true] {
                let act = AttrValue::String(if constant { "Relu" } else { "" }.into());
                let mut conv = NodeSpec::onnx("FusedConv", 1)
                    .domain("opreg")
                    .attr("activation", act.clone())
                    .attr("strides", ints(&st))
                    .attr("pads", ints(&pads));
                if constant {
                    conv = conv.constant(1);
                }
                // A BLAS for CPUs without AVX-512, where the first layers run as products.
                let blas = || -> Option<Box<dyn Blas>> { Some(Box::new(NaiveBlas)) };
                let y = run_kernel(conv_factory, &conv, &[&x, &r.w, &r.b], blas()).expect("conv");
                let pool_node = NodeSpec::onnx("MaxPool", 12)
                    .attr("kernel_shape", ints(&pk))
                    .attr("strides", ints(&ps))
                    .attr("pads", ints(&pp))
                    .attr("ceil_mode", AttrValue::Int(ceil as i64));
                let want =
                    run_kernel(pool::max_pool_factory, &pool_node, &[&y[0]], None).expect("pool");
                let mut fused = NodeSpec::onnx("FusedConvMaxPool", 1)
                    .domain("opreg")
                    .attr("activation", act)
                    .attr("strides", ints(&st))
                    .attr("pads", ints(&pads))
                    .attr("pool_kernel_shape", ints(&pk))
                    .attr("pool_strides", ints(&ps))
                    .attr("pool_pads", ints(&pp))
                    .attr("pool_ceil_mode", AttrValue::Int(ceil as i64));
                if constant {
                    fused = fused.constant(1);
                }
                let got = run_kernel(conv_max_pool_factory, &fused, &[&x, &r.w, &r.b], blas())
                    .expect("fused");
                assert_eq!(got[0].shape(), want[0].shape(), "case {k}");
                let bits = |t: &HostTensor| -> Vec<u32> {
                    t.to_vec::<f32>()
                        .expect("f32")
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                let (got_bits, want_bits) = (bits(&got[0]), bits(&want[0]));
                let first_diff = got_bits.iter().zip(&want_bits).position(|(a, b)| a != b);
                assert_eq!(first_diff, None, "case {k}, constant {constant}");
                let nan = bits(&got[0]).iter().any(|&b| f32::from_bits(b).is_nan());
                assert_eq!(nan, !constant, "case {k}");
            }
        }
        direct::TEST_AVX2.set(false);
        // Refused: a Z, other than f32, rank other than 4, no pool window.
        let r = reference(([1, 3, 8, 40], 8, [3, 3], [1, 1], [1, 1], [0; 4]));
        let fused = NodeSpec::onnx("FusedConvMaxPool", 1)
            .domain("opreg")
            .attr("pool_kernel_shape", ints(&[2, 2]));
        let z = HostTensor::from_vec(&[1, 8, 6, 38], &vec![0.0f32; 8 * 6 * 38]).expect("z");
        let e = run_kernel(conv_max_pool_factory, &fused, &[&r.x, &r.w, &r.b, &z], None)
            .expect_err("Z");
        assert!(e.message.contains("no Z"), "{e:?}");
        let e = run_kernel(
            conv_max_pool_factory,
            &NodeSpec::onnx("FusedConvMaxPool", 1).domain("opreg"),
            &[&r.x, &r.w],
            None,
        )
        .expect_err("no window");
        assert!(e.message.contains("pool_kernel_shape"), "{e:?}");
        let x16 = HostTensor::from_vec(&[1, 3, 8, 40], &vec![f16::ONE; 960]).expect("x");
        let w16 = HostTensor::from_vec(&[8, 3, 3, 3], &vec![f16::ONE; 216]).expect("w");
        let e = run_kernel(conv_max_pool_factory, &fused, &[&x16, &w16], None).expect_err("f16");
        assert_eq!(e.code, ErrorCode::Unimplemented, "{e:?}");
        // Hostile windows: a convolution with no output rows under a padded pool, a pool
        // whose pads dwarf the plane: an error or an answer, never a panic.
        let short = HostTensor::from_vec(&[1, 3, 2, 40], &vec![1.0f32; 240]).expect("x");
        for (pads, kernel) in [([1i64, 1, 1, 1], 3i64), ([1 << 40, 0, 1 << 40, 0], 2)] {
            let hostile = NodeSpec::onnx("FusedConvMaxPool", 1)
                .domain("opreg")
                .attr("pool_kernel_shape", AttrValue::Ints(vec![kernel, kernel]))
                .attr("pool_pads", AttrValue::Ints(pads.to_vec()));
            let _ = run_kernel(conv_max_pool_factory, &hostile, &[&short, &r.w], None);
            let _ = run_kernel(conv_max_pool_factory, &hostile, &[&r.x, &r.w], None);
        }
        let flat = HostTensor::from_vec(&[1, 3, 40], &vec![0.0f32; 120]).expect("x");
        let w1 = HostTensor::from_vec(&[8, 3, 3], &vec![0.0f32; 72]).expect("w");
        let e = run_kernel(conv_max_pool_factory, &fused, &[&flat, &w1], None).expect_err("1-D");
        assert!(e.message.contains("rank 4"), "{e:?}");
    }

    #[test]
    fn deep_convolutions_match_direct_loops() {
        // ResNet's 3x3 layers in small, with output widths around the
        // 14-pixel tiles (7, 12, 13, 25, 40), channel counts around the
        // 16-channel blocks of the channels-last copy (5, 16, 21, 32) and the 32-channel
        // blocks of the output (3, 24, 33, 40), strides, a dilation, a 5x5 window, asymmetric
        // pads, input rows wider than 16 columns, two images; each with the weights given at
        // load (regrouped once) and at run time (regrouped per call).
        // The ninth case's rows are cut into several parallel tasks. The tenth and eleventh
        // run whole images per task (two images), in several groups of 16 tiles, their 40
        // and 20 input channels in blocks of 16 (and a rest). The last three skip the kernel
        // rows that read only padding: a text recognizer's 2-row maps (every row has some),
        // pads past the kernel (the first and last output rows read nothing but padding),
        // and a vertical dilation whose rows of taps straddle the image.
        let cases: [Case; 14] = [
            ([1, 16, 14, 14], 24, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([2, 5, 7, 7], 33, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([1, 21, 5, 20], 40, [3, 3], [1, 1], [1, 1], [0, 1, 2, 1]),
            ([1, 32, 6, 13], 8, [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]),
            ([1, 7, 9, 40], 3, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            ([2, 9, 4, 25], 11, [3, 2], [1, 1], [1, 1], [1, 0, 1, 0]),
            ([1, 17, 11, 36], 32, [3, 3], [2, 3], [2, 2], [2, 1, 0, 3]),
            ([1, 6, 12, 12], 5, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([1, 64, 14, 14], 40, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([2, 40, 30, 30], 24, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([2, 20, 12, 30], 40, [3, 3], [1, 1], [1, 1], [0, 0, 0, 0]),
            ([2, 24, 2, 32], 40, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([1, 16, 3, 9], 16, [3, 3], [1, 1], [1, 1], [3, 1, 3, 1]),
            ([1, 18, 5, 9], 20, [3, 3], [2, 1], [2, 1], [3, 1, 2, 1]),
        ];
        // Both loops where the CPU has both (AVX2 asked for on AVX-512).
        let units = if crate::simd::has_avx512() && crate::simd::has_avx2_fma() {
            &[false, true][..]
        } else {
            &[false][..]
        };
        for (k, (avx2, case)) in units
            .iter()
            .flat_map(|&u| cases.into_iter().map(move |c| (u, c)))
            .enumerate()
        {
            direct::TEST_AVX2.set(avx2);
            let (xs, _, ks, st, dil, pads) = case;
            assert_eq!(
                direct::applies(&xs, &geometry(xs, ks, st, dil, pads), 1),
                direct::Isa::detect().is_some(),
                "case {k}"
            );
            let Reference { x, w, b, ys, want } = reference(case);
            let z: Vec<f32> = (0..want.len())
                .map(|i| (i % 13) as f32 * 0.25 - 1.5)
                .collect();
            let tz = HostTensor::from_vec(&ys, &z).expect("z");
            for (act, params, activation) in [
                ("", vec![], Activation::None),
                ("Relu", vec![], Activation::Relu),
                ("Clip", vec![-0.5, 0.5], Activation::Clip(-0.5, 0.5)),
                ("LeakyRelu", vec![0.1], Activation::LeakyRelu(0.1)),
                ("SiLU", vec![], Activation::SiLU),
            ] {
                for (with_z, constant) in [(false, false), (true, false), (true, true)] {
                    let mut node = NodeSpec::onnx("FusedConv", 1)
                        .domain("opreg")
                        .attr("strides", ints(&st))
                        .attr("dilations", ints(&dil))
                        .attr("pads", ints(&pads))
                        .attr("activation", AttrValue::String(act.into()))
                        .attr("activation_params", AttrValue::Floats(params.clone()));
                    if constant {
                        node = node.constant(1);
                    }
                    let mut inputs = vec![&x, &w, &b];
                    if with_z {
                        inputs.push(&tz);
                    }
                    let out = run_kernel(conv_factory, &node, &inputs, Some(Box::new(NaiveBlas)))
                        .unwrap_or_else(|e| panic!("case {k} {act}: {e}"));
                    assert_eq!(out[0].shape(), &ys[..], "case {k}");
                    let expect: Vec<f32> = want
                        .iter()
                        .zip(&z)
                        .map(|(&v, &zv)| activation.apply(if with_z { v + zv } else { v }))
                        .collect();
                    println!("case {k} {act} z {with_z} constant {constant}");
                    close(&out[0].to_vec::<f32>().expect("f32"), &expect);
                }
            }
        }
    }

    #[test]
    fn depthwise_convolutions_match_direct_loops_in_every_geometry() {
        // (input, kernel, strides, dilations, pads [top, left, bottom, right]): the interior
        // fast loops (3-wide stride 1 and 2, other widths) and the checked edges, padding as
        // wide as the kernel, kernels wider than the input, two images; channel counts around
        // the 16 lanes; images whose channels-last copy is made in bands (the last two);
        // each through the channels-last loop and the per-plane one.
        type Case = ([usize; 4], [usize; 2], [usize; 2], [usize; 2], [usize; 4]);
        let cases: [Case; 13] = [
            ([1, 5, 9, 11], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([2, 4, 8, 8], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            ([1, 3, 7, 9], [3, 3], [2, 2], [1, 1], [0, 0, 1, 1]),
            ([1, 3, 10, 12], [5, 5], [1, 2], [1, 1], [2, 2, 2, 2]),
            ([1, 2, 9, 9], [3, 3], [1, 1], [2, 2], [2, 2, 2, 2]),
            ([1, 2, 6, 7], [3, 2], [1, 3], [1, 2], [0, 3, 1, 0]),
            ([1, 2, 3, 2], [3, 3], [1, 1], [1, 1], [3, 3, 3, 3]),
            ([1, 2, 2, 2], [3, 5], [1, 1], [1, 1], [1, 2, 1, 2]),
            ([1, 7, 4, 33], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            // Rows of 16 outputs or more (runs of 16 with AVX-512): stride 2, dilated 5x5.
            ([2, 3, 9, 40], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            ([1, 2, 12, 37], [5, 5], [1, 1], [2, 2], [4, 4, 4, 4]),
            ([2, 20, 40, 60], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([1, 33, 30, 70], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
        ];
        // The AVX2 tiles too where the CPU has AVX-512 (see `direct::TEST_AVX2`).
        // (Elsewhere the third run would repeat the first.)
        let both = crate::simd::has_avx512() && crate::simd::has_avx2_fma();
        let runs = if both { 3 } else { 2 };
        let variants = [(false, false), (true, false), (false, true)];
        for ((x, k, st, dil, pads), (planes, avx2)) in cases
            .into_iter()
            .flat_map(|case| variants[..runs].iter().map(move |&v| (case, v)))
        {
            let c = x[1];
            assert!(depthwise::applies(&x, c, c));
            depthwise::PLANES_ONLY.with(|f| f.set(planes));
            direct::TEST_AVX2.set(avx2);
            for with_bias in [true, false] {
                check(
                    2,
                    [x[0], c, 1, x[2], x[3]],
                    [c, 1, 1, k[0], k[1]],
                    c,
                    [1, st[0], st[1]],
                    [1, dil[0], dil[1]],
                    [0, pads[0], pads[1], 0, pads[2], pads[3]],
                    with_bias,
                );
            }
        }
        depthwise::PLANES_ONLY.with(|f| f.set(false));
        direct::TEST_AVX2.set(false);
        // The fused activations on narrow (runs of 8) and wide (runs of 16) rows, NaN
        // included: as the plain convolution followed by the activation; 20 channels: a
        // partial register of channels.
        for (xs, planes) in [[1usize, 4, 5, 7], [1, 4, 5, 35], [1, 20, 5, 35]]
            .into_iter()
            .flat_map(|xs| [(xs, false), (xs, true)])
        {
            depthwise::PLANES_ONLY.with(|f| f.set(planes));
            let c = xs[1];
            let mut x = data(xs.iter().product(), 8);
            x[3] = f32::NAN;
            let w = data(c * 9, 9);
            let b = data(c, 10);
            let tx = HostTensor::from_vec(&xs, &x).expect("x");
            let tw = HostTensor::from_vec(&[c, 1, 3, 3], &w).expect("w");
            let tb = HostTensor::from_vec(&[c], &b).expect("b");
            let conv = |node: NodeSpec| {
                run_kernel(
                    conv_factory,
                    &node,
                    &[&tx, &tw, &tb],
                    Some(Box::new(NaiveBlas)),
                )
                .expect("run")[0]
                    .to_vec::<f32>()
                    .expect("f32")
            };
            let node = |op: &str| {
                NodeSpec::onnx(op, 11)
                    .attr("group", AttrValue::Int(c as i64))
                    .attr("pads", ints(&[1, 1, 1, 1]))
            };
            let y = conv(node("Conv"));
            for (act, params, f) in [
                ("Relu", vec![], Activation::Relu),
                ("Clip", vec![0.0, 6.0], Activation::Clip(0.0, 6.0)),
                ("LeakyRelu", vec![0.1], Activation::LeakyRelu(0.1)),
                ("SiLU", vec![], Activation::SiLU),
            ] {
                let fused = node("FusedConv")
                    .domain("opreg")
                    .attr("activation", AttrValue::String(act.into()))
                    .attr("activation_params", AttrValue::Floats(params));
                let got = conv(fused);
                for (i, (g, &v)) in got.iter().zip(&y).enumerate() {
                    let e = f.apply(v);
                    assert!(
                        g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
                        "{xs:?} {act} planes {planes} at {i}: {g} vs {e}"
                    );
                }
            }
        }
        depthwise::PLANES_ONLY.with(|f| f.set(false));
        // Channel multipliers and 1-D/3-D depthwise convolutions take the general path.
        assert!(!depthwise::applies(&[1, 4, 5, 5], 4, 8));
        assert!(!depthwise::applies(&[1, 4, 5], 4, 4));
    }

    #[test]
    fn conv1d_and_conv3d() {
        check(
            1,
            [2, 3, 1, 1, 9],
            [4, 3, 1, 1, 3],
            1,
            [1, 1, 2],
            [1, 1, 2],
            [0, 0, 2, 0, 0, 1],
            true,
        );
        check(
            3,
            [1, 2, 4, 5, 4],
            [2, 2, 2, 3, 2],
            1,
            [2, 1, 1],
            [1, 1, 2],
            [1, 0, 1, 0, 1, 1],
            true,
        );
        check(
            3,
            [1, 4, 3, 3, 3],
            [4, 2, 1, 2, 2],
            2,
            [1, 1, 1],
            [1, 1, 1],
            [0, 1, 1, 0, 0, 0],
            false,
        );
    }

    #[test]
    fn conv_auto_pad_matches_explicit_pads() {
        let xs = [1usize, 2, 7, 6];
        let ws = [3usize, 2, 3, 4];
        let x = data(xs.iter().product(), 4);
        let w = data(ws.iter().product(), 5);
        let tx = HostTensor::from_vec(&xs, &x).expect("x");
        let tw = HostTensor::from_vec(&ws, &w).expect("w");
        let run = |node: NodeSpec| {
            let out = run_kernel(conv_factory, &node, &[&tx, &tw], Some(Box::new(NaiveBlas)))
                .expect("run");
            (
                out[0].shape().to_vec(),
                out[0].to_vec::<f32>().expect("f32"),
            )
        };
        // strides 2: H out = ceil(7/2) = 4, total pad = 3*2+3-7 = 2 -> (1, 1);
        // W out = 3, total = 2*2+4-6 = 2 -> (1, 1). Stride 1 on W: out 6, total 3 -> (1,2)/(2,1).
        for (auto, strides, pads) in [
            ("SAME_UPPER", [2, 2], [1, 1, 1, 1]),
            ("SAME_UPPER", [2, 1], [1, 1, 1, 2]),
            ("SAME_LOWER", [2, 1], [1, 2, 1, 1]),
            ("VALID", [2, 1], [0, 0, 0, 0]),
        ] {
            let auto = run(NodeSpec::onnx("Conv", 11)
                .attr("auto_pad", AttrValue::String(auto.into()))
                .attr("strides", ints(&strides)));
            let explicit = run(NodeSpec::onnx("Conv", 11)
                .attr("pads", ints(&pads))
                .attr("strides", ints(&strides)));
            assert_eq!(auto.0, explicit.0, "{auto:?}");
            close(&auto.1, &explicit.1);
        }
    }

    #[test]
    fn conv_errors() {
        let tx = HostTensor::from_vec(&[1, 3, 4, 4], &[0.0f32; 48]).expect("x");
        let tw = HostTensor::from_vec(&[2, 2, 3, 3], &[0.0f32; 36]).expect("w");
        let err = run_kernel(
            conv_factory,
            &NodeSpec::onnx("Conv", 11),
            &[&tx, &tw],
            Some(Box::new(NaiveBlas)),
        )
        .expect_err("channels");
        assert!(err.message.contains("does not fit"), "{}", err.message);
        // A 1x1 layer is a product, which needs a BLAS.
        let tx = HostTensor::from_vec(&[1, 5, 4, 4], &[0.0f32; 80]).expect("x");
        let tw = HostTensor::from_vec(&[2, 5, 1, 1], &[0.0f32; 10]).expect("w");
        let err = run_kernel(conv_factory, &NodeSpec::onnx("Conv", 11), &[&tx, &tw], None)
            .expect_err("blas");
        assert!(
            err.message.contains("needs a BLAS backend"),
            "{}",
            err.message
        );
    }

    /// Pads that blow a 2x2 input up to ~2^48 output elements: every element type fails the
    /// call as too large (the f16 path used to abort on an infallible f32 buffer).
    #[test]
    fn conv_huge_pads_are_resource_exhausted() {
        let pads = ints(&[0, 0, 1 << 24, 1 << 24]);
        let node = || NodeSpec::onnx("Conv", 22).attr("pads", pads.clone());
        let run = |x: HostTensor, w: HostTensor| {
            run_kernel(conv_factory, &node(), &[&x, &w], Some(Box::new(NaiveBlas)))
                .expect_err("too large")
        };
        let h = |v: f32| f16::from_f32(v);
        let b = |v: f32| bf16::from_f32(v);
        let errs = [
            run(
                HostTensor::from_vec(&[1, 1, 2, 2], &[h(1.0); 4]).expect("x"),
                HostTensor::from_vec(&[1, 1, 1, 1], &[h(1.0)]).expect("w"),
            ),
            run(
                HostTensor::from_vec(&[1, 1, 2, 2], &[b(1.0); 4]).expect("x"),
                HostTensor::from_vec(&[1, 1, 1, 1], &[b(1.0)]).expect("w"),
            ),
            run(
                HostTensor::from_vec(&[1, 1, 2, 2], &[1.0f32; 4]).expect("x"),
                HostTensor::from_vec(&[1, 1, 1, 1], &[1.0f32]).expect("w"),
            ),
            // A 2x2 window over one channel with rows of 2^24 outputs: a first layer
            // (`stem`), whose padded copy would dwarf x, leaves it to the general path.
            run(
                HostTensor::from_vec(&[1, 1, 2, 2], &[1.0f32; 4]).expect("x"),
                HostTensor::from_vec(&[1, 1, 2, 2], &[1.0f32; 4]).expect("w"),
            ),
        ];
        for e in errs {
            assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);
        }
        // Pads and dilations past usize overflow the window arithmetic: invalid, no panic.
        let x = HostTensor::from_vec(&[1, 1, 2, 2], &[1.0f32; 4]).expect("x");
        let w = HostTensor::from_vec(&[1, 1, 2, 2], &[1.0f32; 4]).expect("w");
        for (name, v) in [("pads", [i64::MAX; 4]), ("dilations", [i64::MAX, 3, 0, 0])] {
            let v = if name == "pads" { &v[..] } else { &v[..2] };
            let node = NodeSpec::onnx("Conv", 11).attr(name, AttrValue::Ints(v.to_vec()));
            let e = run_kernel(conv_factory, &node, &[&x, &w], Some(Box::new(NaiveBlas)))
                .expect_err(name);
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{name}: {}", e.message);
        }
    }

    #[test]
    fn conv_official_cases() {
        crate::testcases::run_cases_with(
            &["test_basic_conv_", "test_conv_with_"],
            conv_factory,
            || Some(Box::new(NaiveBlas)),
        );
    }
}
