//! Normalisation: BatchNormalization (inference, and training mode from opset 14),
//! InstanceNormalization, LayerNormalization, GroupNormalization, LRN.

use super::{
    at_least_one, not_implemented_for, optional, register_versions, Arith, Disjoint, Float, Real,
    Scalar, FLOATS,
};
use crate::util::{
    broadcast_strides, fill_from_f64, input, normalize_axis, product_sat, required, walk_offsets,
};
use opreg_sdk::prelude::*;

/// A small float parameter tensor (scale, bias, mean...) of any float type, as `C` values.
fn params<C: Real>(op: &str, name: &str, v: &TensorView<'_>) -> Result<Vec<C>, PluginError> {
    fn conv<T: Float, C: Real>(v: &TensorView<'_>) -> Result<Vec<C>, PluginError> {
        Ok(v.as_slice::<T>()?
            .iter()
            .map(|x| C::from_f64(x.load().to_f64()))
            .collect())
    }
    opreg_sdk::dispatch!(v.dtype, FLOATS, |T| conv::<T, C>(v), other => Err(not_implemented_for(format!("{op} input '{name}'"), other)))
}

/// `params`, checked to hold exactly `len` values.
fn params_len<C: Real>(
    op: &str,
    name: &str,
    v: &TensorView<'_>,
    len: usize,
) -> Result<Vec<C>, PluginError> {
    let p = params::<C>(op, name, v)?;
    if p.len() != len {
        return Err(PluginError::invalid(format!(
            "{op}: input '{name}' has shape {:?}, expected {len} values",
            v.shape()
        )));
    }
    Ok(p)
}

fn nc(op: &str, xs: &[usize]) -> Result<(usize, usize, usize), PluginError> {
    if xs.len() < 2 {
        return Err(PluginError::invalid(format!(
            "{op}: X must have rank >= 2 (N, C, ...), got {xs:?}"
        )));
    }
    Ok((xs[0], xs[1], product_sat(&xs[2..])))
}

crate::simd::simd_fn! {
    /// Mean and (biased) variance of `x`, each sum in [`LANES`] partial sums (combined at the
    /// end) so that the loops vectorize, compiled for AVX-512 and AVX2 too: one accumulator
    /// made each pass a chain of dependent adds (InstanceNormalization over 8x64x56x56 ran at
    /// 2.75x ONNX Runtime). The partial sums also round less than one running sum does.
    fn moments<T: Float>(x: &[T]) -> (T::Compute, T::Compute) {
        let zero = <T::Compute as Arith>::ZERO;
        // The sum of `f(v)` over x (a macro, not a closure through `dyn`: the loop must inline).
        macro_rules! sum_of {
            (|$v:ident| $f:expr) => {{
                let mut lanes = [zero; LANES];
                let mut chunks = x.chunks_exact(LANES);
                for c in &mut chunks {
                    for (a, v) in lanes.iter_mut().zip(c) {
                        let $v = v.load();
                        *a += $f;
                    }
                }
                let mut s = lanes.iter().fold(zero, |s, &a| s + a);
                for v in chunks.remainder() {
                    let $v = v.load();
                    s += $f;
                }
                s
            }};
        }
        let n = <T::Compute as Real>::from_usize(x.len().max(1));
        let mean = sum_of!(|v| v) / n;
        let sq = sum_of!(|v| (v - mean) * (v - mean));
        (mean, sq / n)
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct BatchNorm {
    epsilon: f32,
    /// `Some(momentum)` in training mode (opset 14+, `training_mode = 1`): normalise with the
    /// batch's statistics and output the updated running ones.
    training: Option<f32>,
}

fn batch_norm_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let training_mode = node.int_or("training_mode", 0)?;
    let training = match training_mode {
        0 => None,
        // Opsets before 14 have no training_mode (their training outputs were the saved
        // statistics, with another meaning): only opset 14's form is implemented.
        1 if node.opset >= 14 => Some(node.float_or("momentum", 0.9)?),
        1 => {
            return Err(PluginError::unimplemented(format!(
                "BatchNormalization: training_mode = 1 needs opset 14 or later (got {})",
                node.opset
            )))
        }
        other => {
            return Err(PluginError::invalid(format!(
                "BatchNormalization: training_mode must be 0 or 1, got {other}"
            )))
        }
    };
    if node.opset < 9 && node.int_or("spatial", 1)? == 0 {
        return Err(PluginError::unimplemented(
            "BatchNormalization: spatial = 0 is not supported",
        ));
    }
    Ok(Box::new(BatchNorm {
        epsilon: node.float_or("epsilon", 1e-5)?,
        training,
    }))
}

/// The mean and population (biased) variance of each channel of `x` (`[n, c, plane...]`),
/// over every axis but 1, accumulated in f64. NaN for an empty batch, as numpy's mean of no
/// values.
fn channel_moments<T: Float>(
    ctx: &KernelContext<'_>,
    x: &[T],
    n: usize,
    c: usize,
    plane: usize,
) -> Result<Vec<(f64, f64)>, PluginError> {
    let mut stats = vec![(f64::NAN, f64::NAN); c];
    // Exact whenever x has elements.
    let count = n.saturating_mul(plane);
    if count == 0 || x.is_empty() {
        return Ok(stats);
    }
    let count = count as f64;
    // Plane p of x belongs to channel p % c (c > 0 here: x has elements).
    let channel = |ch: usize| x.chunks_exact(plane).skip(ch).step_by(c).flatten();
    ctx.parallel_chunks(&mut stats, 1, |start, out| {
        for (k, slot) in out.iter_mut().enumerate() {
            let ch = start + k;
            let mean = channel(ch).map(|v| v.to_f64()).sum::<f64>() / count;
            // Two passes, as numpy's var: no cancellation from a sum of squares.
            let var = channel(ch)
                .map(|v| (v.to_f64() - mean) * (v.to_f64() - mean))
                .sum::<f64>()
                / count;
            *slot = (mean, var);
        }
    })?;
    Ok(stats)
}

impl BatchNorm {
    fn run<T: Float>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "BatchNormalization";
        let [xv, sv, bv, mv, vv] =
            required(OP, inputs, ["X", "scale", "B", "input_mean", "input_var"])?;
        let xs = xv.shape();
        let (n, c, plane) = nc(OP, xs)?;
        let scale = params_len::<T::Compute>(OP, "scale", &sv, c)?;
        let bias = params_len::<T::Compute>(OP, "B", &bv, c)?;
        let x = xv.as_slice::<T>()?;
        let (mean, var) = match self.training {
            None => (
                params_len::<T::Compute>(OP, "input_mean", &mv, c)?,
                params_len::<T::Compute>(OP, "input_var", &vv, c)?,
            ),
            Some(momentum) => {
                // As the reference: the batch's statistics (biased variance) normalise X and
                // update the running ones, running = input * momentum + batch * (1 -
                // momentum). They are rounded to X's type first, as the reference computes
                // them in it.
                let input_mean = params_len::<f64>(OP, "input_mean", &mv, c)?;
                let input_var = params_len::<f64>(OP, "input_var", &vv, c)?;
                let round = |v: f64| T::store(<T::Compute as Scalar>::from_f64(v)).to_f64();
                let (batch_mean, batch_var): (Vec<f64>, Vec<f64>) =
                    channel_moments(ctx, x, n, c, plane)?
                        .into_iter()
                        .map(|(m, v)| (round(m), round(v)))
                        .unzip();
                let m = momentum as f64;
                let running = |input: &[f64], batch: &[f64]| -> Vec<f64> {
                    input
                        .iter()
                        .zip(batch)
                        .map(|(&i, &b)| i * m + b * (1.0 - m))
                        .collect()
                };
                // running_mean and running_var have the input statistics' type (T2 / U) and
                // shape.
                for (out, input, batch, src) in [
                    (1, &input_mean, &batch_mean, &mv),
                    (2, &input_var, &batch_var, &vv),
                ] {
                    if ctx.num_outputs() > out {
                        let r = running(input, batch);
                        fill_from_f64(ctx, out, src.dtype, src.shape(), |i| {
                            r.get(i).copied().unwrap_or(f64::NAN)
                        })?;
                    }
                }
                let compute = |v: &[f64]| -> Vec<T::Compute> {
                    v.iter()
                        .map(|&v| <T::Compute as Scalar>::from_f64(v))
                        .collect()
                };
                (compute(&batch_mean), compute(&batch_var))
            }
        };
        let eps = <T::Compute as Scalar>::from_f64(self.epsilon as f64);
        let a: Vec<T::Compute> = (0..c).map(|i| scale[i] / (var[i] + eps).sqrt()).collect();
        let b: Vec<T::Compute> = (0..c).map(|i| bias[i] - mean[i] * a[i]).collect();
        let y = ctx.output_slice_to_overwrite::<T>(0, xs)?;
        if !y.is_empty() {
            let plane = plane.max(1);
            let grain = (16 * 1024 / plane).max(1) * plane;
            ctx.parallel_chunks(y, grain, |start, chunk| {
                for (pi, yp) in chunk.chunks_mut(plane).enumerate() {
                    let p = start / plane + pi;
                    let ch = p % c;
                    affine_plane::<T>(&x[p * plane..(p + 1) * plane], (a[ch], b[ch]), yp);
                }
            })?;
        }
        if self.training.is_some() {
            return Ok(());
        }
        // Opsets before 14 may name the running statistics as outputs; in inference they
        // are the inputs unchanged.
        for out in 1..ctx.num_outputs().min(5) {
            let src = if out % 2 == 1 { &mv } else { &vv };
            let o = ctx.output(out, src.dtype, src.shape())?;
            o.into_bytes()?.copy_from_slice(src.as_bytes()?);
        }
        Ok(())
    }
}

impl Kernel for BatchNorm {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input("BatchNormalization", inputs, 0, "X")?.dtype;
        opreg_sdk::dispatch!(dtype, FLOATS, |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for("BatchNormalization", other)))
    }
}

// ---------------------------------------------------------------------------------------------

/// InstanceNormalization, and GroupNormalization (statistics over groups of channels).
#[derive(Clone)]
struct GroupStats {
    op: &'static str,
    epsilon: f32,
    /// `None` for InstanceNormalization (one group per channel).
    num_groups: Option<usize>,
    /// GroupNormalization before opset 21 takes scale and bias per group.
    per_group_params: bool,
}

fn instance_norm_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(GroupStats {
        op: "InstanceNormalization",
        epsilon: node.float_or("epsilon", 1e-5)?,
        num_groups: None,
        per_group_params: false,
    }))
}

fn group_norm_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let g = at_least_one(node, "GroupNormalization", "num_groups", 0)?;
    Ok(Box::new(GroupStats {
        op: "GroupNormalization",
        epsilon: node.float_or("epsilon", 1e-5)?,
        num_groups: Some(g),
        per_group_params: node.opset < 21,
    }))
}

impl GroupStats {
    fn run<T: Float>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [xv, sv, bv] = required(self.op, inputs, ["X", "scale", "B"])?;
        let xs = xv.shape();
        let (_, c, plane) = nc(self.op, xs)?;
        let groups = self.num_groups.unwrap_or(c);
        if groups == 0 || c % groups != 0 {
            return Err(PluginError::invalid(format!(
                "{}: {c} channels do not split into {groups} groups",
                self.op
            )));
        }
        let params_n = if self.per_group_params { groups } else { c };
        let scale = params_len::<T::Compute>(self.op, "scale", &sv, params_n)?;
        let bias = params_len::<T::Compute>(self.op, "B", &bv, params_n)?;
        let x = xv.as_slice::<T>()?;
        // Every element is written below (each group's planes whole).
        let y = ctx.output_slice_to_overwrite::<T>(0, xs)?;
        if y.is_empty() {
            return Ok(());
        }
        let cpg = c / groups;
        let glen = cpg * plane;
        let eps = <T::Compute as Scalar>::from_f64(self.epsilon as f64);
        let grain = (16 * 1024 / glen.max(1)).max(1) * glen;
        ctx.parallel_chunks(y, grain.max(1), |start, chunk| {
            for (gi, yg) in chunk.chunks_mut(glen).enumerate() {
                let gidx = start / glen + gi;
                let xg = &x[gidx * glen..(gidx + 1) * glen];
                let (mean, var) = moments(xg);
                let inv = <T::Compute as Arith>::ONE / (var + eps).sqrt();
                let group = gidx % groups;
                for (ci, (yp, xp)) in yg
                    .chunks_mut(plane.max(1))
                    .zip(xg.chunks(plane.max(1)))
                    .enumerate()
                {
                    let pi = if self.per_group_params {
                        group
                    } else {
                        group * cpg + ci
                    };
                    let a = scale[pi] * inv;
                    let b = bias[pi] - mean * a;
                    for (yv, xv) in yp.iter_mut().zip(xp) {
                        *yv = T::store(xv.load() * a + b);
                    }
                }
            }
        })
    }
}

impl Kernel for GroupStats {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input(self.op, inputs, 0, "X")?.dtype;
        opreg_sdk::dispatch!(dtype, FLOATS, |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for(self.op, other)))
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct LayerNorm {
    axis: i64,
    epsilon: f32,
}

fn layer_norm_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let stash = node.int_or("stash_type", 1)?;
    if stash != 1 {
        return Err(PluginError::unimplemented(format!(
            "LayerNormalization: stash_type {stash} (only 1, float, is supported)"
        )));
    }
    Ok(Box::new(LayerNorm {
        axis: node.int_or("axis", -1)?,
        epsilon: node.float_or("epsilon", 1e-5)?,
    }))
}

/// A scale or bias of `LayerNormalization` broadcast against X: per row, the values along
/// the normalised dimensions.
struct RowParam<C> {
    /// Expanded over the normalised shape when it does not vary with the row.
    shared: Option<Vec<C>>,
    values: Vec<C>,
    strides: Vec<usize>,
}

impl<C: Real> RowParam<C> {
    fn new(
        op: &str,
        name: &str,
        v: &TensorView<'_>,
        xs: &[usize],
        axis: usize,
    ) -> Result<Self, PluginError> {
        let ps = v.shape();
        let ok = ps.len() <= xs.len()
            && ps
                .iter()
                .rev()
                .zip(xs.iter().rev())
                .all(|(&p, &x)| p == 1 || p == x);
        if !ok {
            return Err(PluginError::invalid(format!(
                "{op}: input '{name}' of shape {ps:?} does not broadcast to X {xs:?}"
            )));
        }
        let values = params::<C>(op, name, v)?;
        let strides = broadcast_strides(ps, xs);
        let shared = if strides[..axis].iter().all(|&s| s == 0) {
            let norm = &xs[axis..];
            let len: usize = norm.iter().product();
            let mut out = Vec::with_capacity(len);
            walk_offsets(norm, &strides[axis..], 0, len, |o| out.push(values[o]));
            Some(out)
        } else {
            None
        };
        Ok(RowParam {
            shared,
            values,
            strides,
        })
    }

    /// The values for `row` (rows of `cols` elements of X of shape `xs`).
    fn row<'a>(&'a self, xs: &[usize], row: usize, cols: usize, buf: &'a mut Vec<C>) -> &'a [C] {
        if let Some(s) = &self.shared {
            return s;
        }
        buf.clear();
        walk_offsets(xs, &self.strides, row * cols, cols, |o| {
            buf.push(self.values[o])
        });
        buf
    }
}

impl LayerNorm {
    /// `(axis, rows, cols)`: the normalized axis, and X as rows of `cols` values. Saturating:
    /// exact whenever X has elements; an empty X returns before the parameters are expanded
    /// over a row (X may be [0, 2^40]).
    fn layout(&self, xs: &[usize]) -> Result<(usize, usize, usize), PluginError> {
        let axis = normalize_axis(self.axis, xs.len()).map_err(|e| {
            PluginError::invalid(format!(
                "LayerNormalization: attribute 'axis': {}",
                e.message
            ))
        })?;
        Ok((axis, product_sat(&xs[..axis]), product_sat(&xs[axis..])))
    }

    fn run<T: Float>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "LayerNormalization";
        let [xv, sv] = required(OP, inputs, ["X", "Scale"])?;
        let xs = xv.shape();
        let (axis, rows, cols) = self.layout(xs)?;
        let x = xv.as_slice::<T>()?;
        let y = ctx.output_slice_to_overwrite::<T>(0, xs)?;
        let mut stat_shape = xs[..axis].to_vec();
        stat_shape.resize(xs.len(), 1);
        let nout = ctx.num_outputs();
        let mut none: [f32; 0] = [];
        let mean_out = if nout > 1 {
            ctx.output_slice::<f32>(1, &stat_shape)?
        } else {
            &mut none[..]
        };
        let mut none2: [f32; 0] = [];
        let inv_out = if nout > 2 {
            ctx.output_slice::<f32>(2, &stat_shape)?
        } else {
            &mut none2[..]
        };
        let (mean_out, inv_out) = (Disjoint::new(mean_out), Disjoint::new(inv_out));
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let scale = RowParam::<T::Compute>::new(OP, "Scale", &sv, xs, axis)?;
        let bias = optional(inputs, 2)
            .map(|b| RowParam::<T::Compute>::new(OP, "B", b, xs, axis))
            .transpose()?;
        let eps = <T::Compute as Scalar>::from_f64(self.epsilon as f64);
        let grain = (16 * 1024 / cols).max(1) * cols;
        ctx.parallel_chunks(y, grain, |start, chunk| {
            let (mut sb, mut bb) = (Vec::new(), Vec::new());
            for (ri, yr) in chunk.chunks_mut(cols).enumerate() {
                let r = start / cols + ri;
                let xr = &x[r * cols..(r + 1) * cols];
                let (mean, var) = moments(xr);
                let inv = <T::Compute as Arith>::ONE / (var + eps).sqrt();
                let s = scale.row(xs, r, cols, &mut sb);
                let b = bias.as_ref().map(|b| b.row(xs, r, cols, &mut bb));
                for j in 0..cols {
                    let v = (xr[j].load() - mean) * inv * s[j];
                    yr[j] = T::store(match b {
                        Some(b) => v + b[j],
                        None => v,
                    });
                }
                if nout > 1 {
                    // SAFETY: row `r` belongs to this task only.
                    unsafe { mean_out.part(r, 1)[0] = mean.to_f64() as f32 };
                }
                if nout > 2 {
                    // SAFETY: as above.
                    unsafe { inv_out.part(r, 1)[0] = inv.to_f64() as f32 };
                }
            }
        })
    }
}

impl LayerNorm {
    /// f32 with Scale and B the same for every row (as in transformers): each row's moments
    /// and normalization in [`layer_norm_row`]. `None` when the parameters vary per row (the
    /// generic path then runs).
    fn run_f32(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<Option<()>, PluginError> {
        const OP: &str = "LayerNormalization";
        let [xv, sv] = required(OP, inputs, ["X", "Scale"])?;
        let xs = xv.shape();
        let (axis, rows, cols) = self.layout(xs)?;
        if rows == 0 || cols == 0 || ctx.num_outputs() > 1 {
            return Ok(None);
        }
        let scale = RowParam::<f32>::new(OP, "Scale", &sv, xs, axis)?;
        let bias = optional(inputs, 2)
            .map(|b| RowParam::<f32>::new(OP, "B", b, xs, axis))
            .transpose()?;
        let (Some(s), b) = (&scale.shared, bias.as_ref().map(|b| &b.shared)) else {
            return Ok(None);
        };
        let b = match b {
            None => None,
            Some(Some(b)) => Some(b.as_slice()),
            Some(None) => return Ok(None),
        };
        let x = xv.as_slice::<f32>()?;
        let y = ctx.output_slice::<f32>(0, xs)?;
        let eps = self.epsilon;
        let grain = (16 * 1024 / cols).max(1) * cols;
        ctx.parallel_chunks(y, grain, |start, chunk| {
            for (xr, yr) in x[start..start + chunk.len()]
                .chunks_exact(cols)
                .zip(chunk.chunks_exact_mut(cols))
            {
                layer_norm_row(xr, yr, s, b, eps);
            }
        })?;
        Ok(Some(()))
    }
}

/// Lanes of the sums in [`layer_norm_row`] and [`moments`]: independent partial sums, so that
/// they vectorize.
const LANES: usize = 16;

/// The sum of `x` in [`LANES`] partial sums.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

crate::simd::simd_fn! {
    /// `y = x * a + b` over one plane (BatchNormalization in inference), a multiply then an
    /// add as before (no fused rounding), compiled for AVX-512 and AVX2 too: the SSE2
    /// baseline's 4 lanes took 4.4x ONNX Runtime's time on 8x64x56x56.
    fn affine_plane<T: Float>(x: &[T], ab: (T::Compute, T::Compute), y: &mut [T]) {
        let (a, b) = ab;
        for (yv, xv) in y.iter_mut().zip(x) {
            *yv = T::store(xv.load() * a + b);
        }
    }
}

crate::simd::simd_fn! {
    /// One row of LayerNormalization in f32, as the generic path computes it (mean, then the
    /// population variance around it, `(x - mean) / sqrt(var + eps) * scale + bias`), with the
    /// sums in [`LANES`] partial sums (the generic path's single running sums stay serial),
    /// compiled for AVX-512 and AVX2 too.
    fn layer_norm_row(x: &[f32], y: &mut [f32], scale: &[f32], bias: Option<&[f32]>, eps: f32) {
        let n = x.len().max(1) as f32;
        let mean = lane_sum(x, |v| v) / n;
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
        let inv = 1.0 / (var + eps).sqrt();
        match bias {
            Some(b) => {
                for (((o, &v), &s), &b) in y.iter_mut().zip(x).zip(scale).zip(b) {
                    *o = (v - mean) * inv * s + b;
                }
            }
            None => {
                for ((o, &v), &s) in y.iter_mut().zip(x).zip(scale) {
                    *o = (v - mean) * inv * s;
                }
            }
        }
    }
}

impl Kernel for LayerNorm {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input("LayerNormalization", inputs, 0, "X")?.dtype;
        if dtype == DType::F32 && self.run_f32(ctx, inputs)?.is_some() {
            return Ok(());
        }
        opreg_sdk::dispatch!(dtype, FLOATS, |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for("LayerNormalization", other)))
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Lrn {
    alpha: f32,
    beta: f32,
    bias: f32,
    size: usize,
}

fn lrn_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let size = node.int_or("size", 0)?;
    if size < 1 {
        return Err(PluginError::invalid(format!(
            "LRN: attribute 'size' is required and must be >= 1, got {size}"
        )));
    }
    Ok(Box::new(Lrn {
        alpha: node.float_or("alpha", 1e-4)?,
        beta: node.float_or("beta", 0.75)?,
        bias: node.float_or("bias", 1.0)?,
        size: size as usize,
    }))
}

impl Lrn {
    fn run<T: Float>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input("LRN", inputs, 0, "X")?;
        let xs = xv.shape();
        let (_, c, plane) = nc("LRN", xs)?;
        let x = xv.as_slice::<T>()?;
        let y = ctx.output_slice::<T>(0, xs)?;
        if y.is_empty() {
            return Ok(());
        }
        let before = (self.size - 1) / 2;
        let after = self.size - 1 - before;
        let alpha = <T::Compute as Scalar>::from_f64(self.alpha as f64 / self.size as f64);
        let beta = <T::Compute as Scalar>::from_f64(self.beta as f64);
        let bias = <T::Compute as Scalar>::from_f64(self.bias as f64);
        let grain = (16 * 1024 / plane).max(1) * plane;
        ctx.parallel_chunks(y, grain, |start, chunk| {
            for (pi, yp) in chunk.chunks_mut(plane).enumerate() {
                let p = start / plane + pi;
                let (n, ch) = (p / c, p % c);
                let lo = ch.saturating_sub(before);
                let hi = (ch + after).min(c - 1);
                for (i, yv) in yp.iter_mut().enumerate() {
                    let mut sq = <T::Compute as Arith>::ZERO;
                    for cc in lo..=hi {
                        let v = x[(n * c + cc) * plane + i].load();
                        sq += v * v;
                    }
                    let xv = x[p * plane + i].load();
                    *yv = T::store(xv / (bias + alpha * sq).powf(beta));
                }
            }
        })
    }
}

impl Kernel for Lrn {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input("LRN", inputs, 0, "X")?.dtype;
        opreg_sdk::dispatch!(dtype, FLOATS, |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for("LRN", other)))
    }
}

pub fn register(r: &mut Registrar) {
    let t: &[(&str, &[DType])] = &[("T", FLOATS)];
    register_versions(
        r,
        "BatchNormalization",
        &[7, 9, 14, 15],
        &[("T", FLOATS), ("T1", FLOATS), ("T2", FLOATS)],
        &["T", "T1", "T1", "T2", "T2"],
        &["T", "T2", "T2"],
        batch_norm_factory,
    );
    register_versions(
        r,
        "InstanceNormalization",
        &[6, 22],
        t,
        &["T", "T", "T"],
        &["T"],
        instance_norm_factory,
    );
    register_versions(
        r,
        "LayerNormalization",
        &[17],
        &[("T", FLOATS), ("U", &[DType::F32])],
        &["T", "T", "T"],
        &["T", "U", "U"],
        layer_norm_factory,
    );
    register_versions(
        r,
        "GroupNormalization",
        &[18, 21],
        t,
        &["T", "T", "T"],
        &["T"],
        group_norm_factory,
    );
    register_versions(r, "LRN", &[1, 13], t, &["T"], &["T"], lrn_factory);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, run_kernel_opt, NodeSpec},
    };

    fn close(a: &[f32], b: &[f32]) {
        crate::util::testing::assert_close(a, b, 1e-4);
    }

    fn t(shape: &[usize], v: &[f32]) -> HostTensor {
        HostTensor::from_vec(shape, v).expect("tensor")
    }

    fn data(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 3.0)
            .collect()
    }

    /// Normalises consecutive slices of `len` with the naive two-pass formula.
    fn naive_norm(x: &[f32], len: usize, eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut y, mut means, mut invs) = (Vec::new(), Vec::new(), Vec::new());
        for s in x.chunks(len) {
            let m = s.iter().sum::<f32>() / len as f32;
            let v = s.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / len as f32;
            let inv = 1.0 / (v + eps).sqrt();
            y.extend(s.iter().map(|a| (a - m) * inv));
            means.push(m);
            invs.push(inv);
        }
        (y, means, invs)
    }

    #[test]
    fn batch_norm_inference() {
        let x = data(2 * 3 * 4);
        let scale = [1.0f32, 2.0, 0.5];
        let bias = [0.0f32, 1.0, -1.0];
        let mean = [0.5f32, -0.5, 0.0];
        let var = [1.0f32, 4.0, 0.25];
        let out = run_kernel(
            batch_norm_factory,
            &NodeSpec::onnx("BatchNormalization", 15).attr("epsilon", AttrValue::Float(0.0)),
            &[
                &t(&[2, 3, 2, 2], &x),
                &t(&[3], &scale),
                &t(&[3], &bias),
                &t(&[3], &mean),
                &t(&[3], &var),
            ],
            None,
        )
        .expect("run");
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let c = (i / 4) % 3;
                (v - mean[c]) / var[c].sqrt() * scale[c] + bias[c]
            })
            .collect();
        close(&out[0].to_vec::<f32>().expect("y"), &want);
    }

    #[test]
    fn conformance_batch_norm() {
        // Inference and training mode (test_batchnorm_*_training_mode).
        crate::testcases::run_cases_min(&["test_batchnorm"], 4, batch_norm_factory);
    }

    fn training_node(momentum: f32) -> NodeSpec {
        NodeSpec::onnx("BatchNormalization", 15)
            .attr("epsilon", AttrValue::Float(0.0))
            .attr("momentum", AttrValue::Float(momentum))
            .attr("training_mode", AttrValue::Int(1))
            .outputs(3)
    }

    #[test]
    fn batch_norm_training_by_hand() {
        // [N=2, C=2, 1]: channel 0 holds {1, 3} (mean 2, biased variance 1), channel 1
        // {10, 20} (mean 15, variance 25).
        let x = t(&[2, 2, 1], &[1.0, 10.0, 3.0, 20.0]);
        let out = run_kernel(
            batch_norm_factory,
            &training_node(0.5),
            &[
                &x,
                &t(&[2], &[1.0, 2.0]),
                &t(&[2], &[0.0, 1.0]),
                &t(&[2], &[0.0, 5.0]),
                &t(&[2], &[1.0, 1.0]),
            ],
            None,
        )
        .expect("run");
        assert_eq!(out.len(), 3);
        // Normalised with the batch's statistics, not the inputs'.
        close(&out[0].to_vec::<f32>().expect("y"), &[-1.0, -1.0, 1.0, 3.0]);
        // running = input * 0.5 + batch * 0.5, with the biased batch variance.
        close(&out[1].to_vec::<f32>().expect("mean"), &[1.0, 10.0]);
        close(&out[2].to_vec::<f32>().expect("var"), &[1.0, 13.0]);
        assert_eq!(out[1].shape(), &[2]);
    }

    #[test]
    fn batch_norm_training_keeps_the_statistics_type() {
        // X in f32, the running statistics in f64 (T2 may differ from T): outputs 1 and 2
        // are f64; only Y asked for gives Y alone.
        let x = t(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
        let one = t(&[1], &[1.0]);
        let zero = t(&[1], &[0.0]);
        let mean = HostTensor::from_vec(&[1], &[4.0f64]).expect("mean");
        let var = HostTensor::from_vec(&[1], &[2.0f64]).expect("var");
        let out = run_kernel(
            batch_norm_factory,
            &training_node(0.75),
            &[&x, &one, &zero, &mean, &var],
            None,
        )
        .expect("run");
        // Batch mean 2.5, variance 1.25.
        assert_eq!(out[1].to_vec::<f64>().expect("mean"), vec![3.625]);
        assert_eq!(out[2].to_vec::<f64>().expect("var"), vec![1.8125]);
        let out = run_kernel(
            batch_norm_factory,
            &training_node(0.75).outputs(1),
            &[&x, &one, &zero, &mean, &var],
            None,
        )
        .expect("run");
        assert_eq!(out.len(), 1);
        let s = 1.25f32.sqrt();
        close(
            &out[0].to_vec::<f32>().expect("y"),
            &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s],
        );
    }

    #[test]
    fn batch_norm_training_refuses_malformed_nodes() {
        let x = t(&[2, 2, 1], &[1.0, 10.0, 3.0, 20.0]);
        let two = t(&[2], &[1.0, 1.0]);
        let three = t(&[3], &[0.0, 0.0, 0.0]);
        let err = run_kernel(
            batch_norm_factory,
            &training_node(0.9),
            &[&x, &two, &two, &three, &two],
            None,
        )
        .expect_err("input_mean has 3 values for 2 channels");
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
        assert!(err.message.contains("input_mean"), "{err}");
        let err = run_kernel(
            batch_norm_factory,
            &NodeSpec::onnx("BatchNormalization", 15).attr("training_mode", AttrValue::Int(2)),
            &[&x, &two, &two, &two, &two],
            None,
        )
        .expect_err("training_mode 2");
        assert!(err.message.contains("training_mode"), "{err}");
        // X of rank 1 has no channel axis.
        let err = run_kernel(
            batch_norm_factory,
            &training_node(0.9),
            &[&two, &two, &two, &two, &two],
            None,
        )
        .expect_err("rank 1");
        assert!(err.message.contains("rank >= 2"), "{err}");
    }

    #[test]
    fn batch_norm_training_of_an_empty_batch() {
        // No values: the batch statistics are NaN, as numpy's mean of nothing; Y is empty.
        let x = t(&[0, 2, 3], &[]);
        let two = t(&[2], &[1.0, 1.0]);
        let out = run_kernel(
            batch_norm_factory,
            &training_node(0.9),
            &[&x, &two, &two, &two, &two],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[0, 2, 3]);
        assert!(out[1]
            .to_vec::<f32>()
            .expect("mean")
            .iter()
            .all(|v| v.is_nan()));
    }

    #[test]
    fn batch_norm_inference_of_the_training_outputs() {
        use opreg_sdk::ValueInfo;
        let value = |dtype: DType, shape: &'static [i64]| ValueInfo {
            name: "",
            present: true,
            dtype,
            shape: Some(shape),
            constant: None,
        };
        let spec = training_node(0.9);
        let info = NodeInfo {
            name: "n",
            domain: "",
            op_type: "BatchNormalization",
            opset: 15,
            device: Device::CPU,
            attributes: std::borrow::Cow::Borrowed(spec.attributes.as_slice()),
            inputs: vec![
                value(DType::F16, &[-1, 3, 4, 5]),
                value(DType::F16, &[3]),
                value(DType::F16, &[3]),
                value(DType::F32, &[3]),
                value(DType::F32, &[3]),
            ],
            outputs: vec![value(DType::UNDEFINED, &[]); 3],
            blas: None,
            context: None,
        };
        let facts = crate::infer::infer(&info).expect("infer");
        assert_eq!(facts[0].dtype, Some(DType::F16));
        assert_eq!(facts[0].shape, Some(vec![-1, 3, 4, 5]));
        for f in &facts[1..] {
            assert_eq!(f.dtype, Some(DType::F32));
            assert_eq!(f.shape, Some(vec![3]));
        }
    }

    #[test]
    fn moments_match_an_f64_reference_over_whole_lanes_and_a_tail() {
        for len in [1usize, 15, 16, 17, 1037, 3136] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.3) * 5.0 + 100.0)
                .collect();
            let (mean, var) = moments(&x);
            let m64 = x.iter().map(|&v| f64::from(v)).sum::<f64>() / len as f64;
            let v64 = x.iter().map(|&v| (f64::from(v) - m64).powi(2)).sum::<f64>() / len as f64;
            assert!(
                (f64::from(mean) - m64).abs() <= 1e-5 * m64.abs(),
                "{len}: {mean} vs {m64}"
            );
            assert!(
                (f64::from(var) - v64).abs() <= 1e-4 * v64 + 1e-6,
                "{len}: {var} vs {v64}"
            );
        }
    }

    #[test]
    fn instance_and_group_norm() {
        let x = data(2 * 4 * 3);
        let xt = t(&[2, 4, 3], &x);
        let scale = [1.0f32, 2.0, 3.0, 4.0];
        let bias = [0.5f32, 0.0, -0.5, 1.0];
        let out = run_kernel(
            instance_norm_factory,
            &NodeSpec::onnx("InstanceNormalization", 6),
            &[&xt, &t(&[4], &scale), &t(&[4], &bias)],
            None,
        )
        .expect("run");
        let (n, _, _) = naive_norm(&x, 3, 1e-5);
        let want: Vec<f32> = n
            .iter()
            .enumerate()
            .map(|(i, v)| v * scale[(i / 3) % 4] + bias[(i / 3) % 4])
            .collect();
        close(&out[0].to_vec::<f32>().expect("y"), &want);
        // Two groups of two channels; opset 21: per-channel scale and bias.
        let (n, _, _) = naive_norm(&x, 6, 1e-5);
        let out = run_kernel(
            group_norm_factory,
            &NodeSpec::onnx("GroupNormalization", 21).attr("num_groups", AttrValue::Int(2)),
            &[&xt, &t(&[4], &scale), &t(&[4], &bias)],
            None,
        )
        .expect("run");
        let want: Vec<f32> = n
            .iter()
            .enumerate()
            .map(|(i, v)| v * scale[(i / 3) % 4] + bias[(i / 3) % 4])
            .collect();
        close(&out[0].to_vec::<f32>().expect("y"), &want);
        // Opset 18: per-group.
        let out = run_kernel(
            group_norm_factory,
            &NodeSpec::onnx("GroupNormalization", 18).attr("num_groups", AttrValue::Int(2)),
            &[&xt, &t(&[2], &scale[..2]), &t(&[2], &bias[..2])],
            None,
        )
        .expect("run");
        let want: Vec<f32> = n
            .iter()
            .enumerate()
            .map(|(i, v)| v * scale[(i / 6) % 2] + bias[(i / 6) % 2])
            .collect();
        close(&out[0].to_vec::<f32>().expect("y"), &want);
        let err = run_kernel(
            group_norm_factory,
            &NodeSpec::onnx("GroupNormalization", 18).attr("num_groups", AttrValue::Int(2)),
            &[&xt, &t(&[4], &scale), &t(&[4], &bias)],
            None,
        )
        .expect_err("opset 18 scale is per group");
        assert!(err.message.contains("'scale'"), "{}", err.message);
    }

    #[test]
    fn layer_norm_axes_and_stats() {
        let x = data(2 * 3 * 4);
        let xt = t(&[2, 3, 4], &x);
        // axis -1, scale and bias of shape [4], Mean and InvStdDev requested.
        let scale = [1.0f32, 0.5, 2.0, -1.0];
        let bias = [0.0f32, 1.0, 0.0, 2.0];
        let out = run_kernel(
            layer_norm_factory,
            &NodeSpec::onnx("LayerNormalization", 17).outputs(3),
            &[&xt, &t(&[4], &scale), &t(&[4], &bias)],
            None,
        )
        .expect("run");
        let (n, m, inv) = naive_norm(&x, 4, 1e-5);
        let want: Vec<f32> = n
            .iter()
            .enumerate()
            .map(|(i, v)| v * scale[i % 4] + bias[i % 4])
            .collect();
        close(&out[0].to_vec::<f32>().expect("y"), &want);
        assert_eq!(out[1].shape(), &[2, 3, 1]);
        close(&out[1].to_vec::<f32>().expect("mean"), &m);
        close(&out[2].to_vec::<f32>().expect("inv"), &inv);
        // axis 1 over [3, 4]; scale broadcast from [4]; no bias.
        let out = run_kernel_opt(
            layer_norm_factory,
            &NodeSpec::onnx("LayerNormalization", 17).attr("axis", AttrValue::Int(1)),
            &[Some(&xt), Some(&t(&[4], &scale)), None],
            None,
        )
        .expect("run");
        let (n, _, _) = naive_norm(&x, 12, 1e-5);
        let want: Vec<f32> = n
            .iter()
            .enumerate()
            .map(|(i, v)| v * scale[i % 4])
            .collect();
        close(&out[0].to_vec::<f32>().expect("y"), &want);
        // f64 input.
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let out = run_kernel(
            layer_norm_factory,
            &NodeSpec::onnx("LayerNormalization", 17),
            &[
                &HostTensor::from_vec(&[6, 4], &x64).expect("x"),
                &HostTensor::from_vec(&[4], &[1.0f64; 4]).expect("s"),
            ],
            None,
        )
        .expect("run");
        let (n, _, _) = naive_norm(&x, 4, 1e-5);
        let y: Vec<f32> = out[0]
            .to_vec::<f64>()
            .expect("y")
            .iter()
            .map(|&v| v as f32)
            .collect();
        close(&y, &n);
    }

    #[test]
    fn lrn_across_channels() {
        let x = data(5 * 2);
        let out = run_kernel(
            lrn_factory,
            &NodeSpec::onnx("LRN", 13)
                .attr("size", AttrValue::Int(3))
                .attr("alpha", AttrValue::Float(0.3))
                .attr("beta", AttrValue::Float(0.6))
                .attr("bias", AttrValue::Float(2.0)),
            &[&t(&[1, 5, 2], &x)],
            None,
        )
        .expect("run");
        let want: Vec<f32> = (0..10usize)
            .map(|i| {
                let (c, s) = (i / 2, i % 2);
                let sq: f32 = (c.saturating_sub(1)..=(c + 1).min(4))
                    .map(|cc| x[cc * 2 + s] * x[cc * 2 + s])
                    .sum();
                x[i] / (2.0 + 0.3 / 3.0 * sq).powf(0.6)
            })
            .collect();
        close(&out[0].to_vec::<f32>().expect("y"), &want);
    }

    /// An empty X of shape [0, 2^40] normalises to an empty Y: the broadcast scale is not
    /// expanded over the (huge) row.
    #[test]
    fn layer_norm_of_empty_input_with_huge_rows() {
        let x = HostTensor::from_vec::<f32>(&[0, 1 << 40], &[]).expect("x");
        let scale = HostTensor::from_vec(&[1], &[2.0f32]).expect("scale");
        let out = run_kernel(
            layer_norm_factory,
            &NodeSpec::onnx("LayerNormalization", 17),
            &[&x, &scale],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[0, 1 << 40]);
    }
}
