//! Operators that rearrange a tensor's elements: Reshape, Flatten, Squeeze, Unsqueeze,
//! Transpose, Concat, Split, Slice, Expand, Tile, Pad, DepthToSpace, SpaceToDepth, Trilu,
//! ReverseSequence.

use super::common::*;
use crate::util::{broadcast_shapes, broadcast_strides, normalize_axis, numel, product_sat};
use opreg_sdk::{alloc::try_with_capacity, prelude::*};

fn dims(v: &[i64], what: &str) -> Result<Vec<usize>, PluginError> {
    v.iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| PluginError::invalid(format!("{what}: negative dimension {d}")))
        })
        .collect()
}

fn axes_of(v: &[i64], rank: usize, what: &str) -> Result<Vec<usize>, PluginError> {
    let mut out = Vec::with_capacity(v.len());
    for &a in v {
        let a = normalize_axis(a, rank)
            .map_err(|e| PluginError::invalid(format!("{what}: {}", e.message)))?;
        if out.contains(&a) {
            return Err(PluginError::invalid(format!("{what}: axis {a} repeated")));
        }
        out.push(a);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Reshape

#[derive(Clone)]
pub(crate) struct Reshape {
    allowzero: bool,
    /// Opsets 1-4: the target shape is an attribute.
    attr_shape: Option<Vec<i64>>,
}

pub(crate) fn reshape_shape(
    input: &[usize],
    target: &[i64],
    allowzero: bool,
) -> Result<Vec<usize>, PluginError> {
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 => {
                if infer.replace(i).is_some() {
                    return Err(PluginError::invalid("Reshape: shape has more than one -1"));
                }
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(i).ok_or_else(|| {
                PluginError::invalid(format!(
                    "Reshape: shape[{i}] = 0 copies a dimension the input {input:?} lacks"
                ))
            })?),
            t if t < 0 => {
                return Err(PluginError::invalid(format!(
                    "Reshape: invalid dimension {t} in shape"
                )))
            }
            t => out.push(t as usize),
        }
    }
    // Saturating products: the target is data, and a product past usize cannot match.
    let total = product_sat(input);
    if let Some(i) = infer {
        let known = product_sat(&out);
        if known == 0 {
            return Err(PluginError::invalid(format!(
                "Reshape: cannot infer -1 in {target:?} next to a 0 dimension"
            )));
        }
        if !total.is_multiple_of(known) {
            return Err(PluginError::invalid(format!(
                "Reshape: {input:?} does not reshape to {target:?}"
            )));
        }
        out[i] = total / known;
    }
    if product_sat(&out) != total {
        return Err(PluginError::invalid(format!(
            "Reshape: {input:?} does not reshape to {target:?}"
        )));
    }
    Ok(out)
}

impl Kernel for Reshape {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Reshape")?;
        let target = match &self.attr_shape {
            Some(s) => s.clone(),
            None => input(x, 1, "Reshape")?.to_i64s()?,
        };
        let shape = reshape_shape(data.shape(), &target, self.allowzero)?;
        copy_reshaped(ctx, data, &shape)
    }
}

// ---------------------------------------------------------------------------------------------
// Flatten

#[derive(Clone)]
pub(crate) struct Flatten {
    axis: i64,
}

impl Kernel for Flatten {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Flatten")?;
        let r = data.rank() as i64;
        if self.axis < -r || self.axis > r {
            return Err(PluginError::invalid(format!(
                "Flatten: axis {} out of range for rank {r}",
                self.axis
            )));
        }
        let axis = if self.axis < 0 {
            self.axis + r
        } else {
            self.axis
        } as usize;
        // Saturating: exact unless the input is empty with huge extents.
        let outer = product_sat(&data.shape()[..axis]);
        let inner = product_sat(&data.shape()[axis..]);
        copy_reshaped(ctx, data, &[outer, inner])
    }
}

// ---------------------------------------------------------------------------------------------
// Squeeze / Unsqueeze

#[derive(Clone)]
pub(crate) struct Squeeze {
    attr_axes: Option<Vec<i64>>,
}

impl Kernel for Squeeze {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Squeeze")?;
        let axes = match (&self.attr_axes, optional(x, 1)) {
            (Some(a), _) => Some(a.clone()),
            (None, Some(v)) => Some(v.to_i64s()?),
            (None, None) => None,
        };
        // An empty axes list squeezes every 1-sized dimension, as ONNX Runtime does.
        let axes = axes.filter(|a| !a.is_empty());
        let shape = data.shape();
        let out: Vec<usize> = match axes {
            None => shape.iter().copied().filter(|&d| d != 1).collect(),
            Some(a) => {
                let axes = axes_of(&a, shape.len(), "Squeeze axes")?;
                for &a in &axes {
                    if shape[a] != 1 {
                        return Err(PluginError::invalid(format!(
                            "Squeeze: dimension {a} of {shape:?} is not 1"
                        )));
                    }
                }
                shape
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, &d)| d)
                    .collect()
            }
        };
        copy_reshaped(ctx, data, &out)
    }
}

#[derive(Clone)]
pub(crate) struct Unsqueeze {
    attr_axes: Option<Vec<i64>>,
}

impl Kernel for Unsqueeze {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Unsqueeze")?;
        let a = match &self.attr_axes {
            Some(a) => a.clone(),
            None => input(x, 1, "Unsqueeze")?.to_i64s()?,
        };
        let rank = data.rank() + a.len();
        let axes = axes_of(&a, rank, "Unsqueeze axes")?;
        let mut src = data.shape().iter();
        let out: Vec<usize> = (0..rank)
            .map(|i| {
                if axes.contains(&i) {
                    1
                } else {
                    src.next().copied().unwrap_or(1)
                }
            })
            .collect();
        copy_reshaped(ctx, data, &out)
    }
}

// ---------------------------------------------------------------------------------------------
// Transpose

#[derive(Clone)]
pub(crate) struct Transpose {
    perm: Option<Vec<i64>>,
}

impl Kernel for Transpose {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Transpose")?;
        let rank = data.rank();
        let perm: Vec<usize> = match &self.perm {
            None => (0..rank).rev().collect(),
            Some(p) => {
                if p.len() != rank {
                    return Err(PluginError::invalid(format!(
                        "Transpose: perm {p:?} does not match rank {rank}"
                    )));
                }
                axes_of(p, rank, "Transpose perm")?
            }
        };
        let out: Vec<usize> = perm.iter().map(|&p| data.shape()[p]).collect();
        copy_permuted(ctx, data, data.shape(), &perm, &out)
    }
}

// ---------------------------------------------------------------------------------------------
// Concat

#[derive(Clone)]
pub(crate) struct Concat {
    axis: i64,
}

fn concat_run<T: Elem>(
    ctx: &KernelContext<'_>,
    xs: &[TensorView<'_>],
    axis: usize,
    out_shape: &[usize],
) -> Result<(), PluginError> {
    // Saturating: exact whenever the output has elements (empty inputs may carry huge
    // extents, and then nothing is copied).
    let inner = product_sat(&out_shape[axis + 1..]);
    let srcs: Vec<(&[T], usize)> = xs
        .iter()
        .map(|v| Ok((T::slice(v)?, v.shape()[axis].saturating_mul(inner))))
        .collect::<Result<_, PluginError>>()?;
    // Where each input's piece starts within one output row (the run along `axis` and in).
    let mut starts = try_with_capacity(srcs.len())?;
    let mut row = 0usize;
    for (_, n) in &srcs {
        starts.push(row);
        row = row.saturating_add(*n);
    }
    let dst = T::slice_mut(output_written(ctx, 0, xs[0].dtype, out_shape)?)?;
    if row == 0 {
        return Ok(());
    }
    // Tasks of GRAIN output elements whatever the rows: a batch-1 channel concat is one row
    // (SqueezeNet's fire modules: one 1.5 MB row, copied by one thread as a task per row).
    ctx.parallel_chunks(dst, GRAIN, |start, chunk| {
        let mut pos = start;
        let mut done = 0;
        while done < chunk.len() {
            let (o, r) = (pos / row, pos % row);
            // The piece holding offset `r` (the last starting at or before it: an empty
            // input shares its start with the next and is skipped).
            let i = starts.partition_point(|&s| s <= r).saturating_sub(1);
            let (Some((s, n)), Some(&at)) = (srcs.get(i), starts.get(i)) else {
                break;
            };
            let off = r - at;
            let take = (n - off).min(chunk.len() - done);
            if take == 0 {
                break;
            }
            chunk[done..done + take].clone_from_slice(&s[o * n + off..][..take]);
            pos += take;
            done += take;
        }
    })
}

impl Kernel for Concat {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let xs: Vec<TensorView<'_>> = x.iter().filter(|v| !v.is_absent()).copied().collect();
        let first = xs
            .first()
            .ok_or_else(|| PluginError::invalid("Concat: no inputs"))?;
        let rank = first.rank();
        let axis = normalize_axis(self.axis, rank)
            .map_err(|e| PluginError::invalid(format!("Concat axis: {}", e.message)))?;
        let mut out = first.shape().to_vec();
        out[axis] = 0;
        for (i, v) in xs.iter().enumerate() {
            let ok = v.rank() == rank
                && v.dtype == first.dtype
                && (0..rank).all(|d| d == axis || v.shape()[d] == first.shape()[d]);
            if !ok {
                return Err(PluginError::invalid(format!(
                    "Concat: input {i} ({} {:?}) does not match input 0 ({} {:?}) off axis {axis}",
                    v.dtype,
                    v.shape(),
                    first.dtype,
                    first.shape()
                )));
            }
            out[axis] = out[axis].checked_add(v.shape()[axis]).ok_or_else(|| {
                PluginError::new(
                    ErrorCode::ResourceExhausted,
                    format!("Concat: the extents along axis {axis} overflow"),
                )
            })?;
        }
        by_elem!(first.dtype, concat_run(ctx, &xs, axis, &out))
    }
}

// ---------------------------------------------------------------------------------------------
// Split

#[derive(Clone)]
pub(crate) struct Split {
    axis: i64,
    attr_split: Option<Vec<i64>>,
    num_outputs: Option<i64>,
    opset: i32,
}

fn split_run<T: Elem>(
    ctx: &KernelContext<'_>,
    x: &TensorView<'_>,
    axis: usize,
    sizes: &[usize],
) -> Result<(), PluginError> {
    let src = T::slice(x)?;
    let shape = x.shape();
    // Saturating: exact whenever X has elements; otherwise nothing is copied.
    let inner = product_sat(&shape[axis + 1..]);
    let row = shape[axis].saturating_mul(inner);
    let mut begin = 0;
    for (j, &s) in sizes.iter().enumerate() {
        let mut oshape = shape.to_vec();
        oshape[axis] = s;
        // Every element: one run per outer index.
        let dst = T::slice_mut(output_written(ctx, j, x.dtype, &oshape)?)?;
        let n = s.saturating_mul(inner);
        let b = begin * inner;
        par_runs(ctx, dst, n, |o| &src[o * row + b..o * row + b + n])?;
        begin += s;
    }
    Ok(())
}

impl Kernel for Split {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Split")?;
        let axis = normalize_axis(self.axis, data.rank())
            .map_err(|e| PluginError::invalid(format!("Split axis: {}", e.message)))?;
        let dim = data.shape()[axis];
        let n = ctx.num_outputs();
        let given = match optional(x, 1) {
            Some(v) => Some(v.to_i64s()?),
            None => self.attr_split.clone(),
        };
        let sizes: Vec<usize> = match given {
            Some(s) => {
                let s = dims(&s, "Split split")?;
                let total = s.iter().try_fold(0usize, |a, &b| a.checked_add(b));
                if s.len() != n || total != Some(dim) {
                    return Err(PluginError::invalid(format!(
                        "Split: split {s:?} does not cover dimension {dim} in {n} outputs"
                    )));
                }
                s
            }
            None => {
                if let Some(k) = self.num_outputs {
                    if k as usize != n {
                        return Err(PluginError::invalid(format!(
                            "Split: num_outputs {k} but the node has {n} outputs"
                        )));
                    }
                }
                if n == 0 {
                    return Err(PluginError::invalid("Split: no outputs"));
                }
                if self.opset >= 18 {
                    // Chunks of ceil(dim / n); the last one smaller.
                    let c = dim.div_ceil(n);
                    (0..n).map(|j| c.min(dim.saturating_sub(j * c))).collect()
                } else {
                    if !dim.is_multiple_of(n) {
                        return Err(PluginError::invalid(format!(
                            "Split: dimension {dim} does not split evenly into {n} outputs"
                        )));
                    }
                    vec![dim / n; n]
                }
            }
        };
        by_elem!(data.dtype, split_run(ctx, data, axis, &sizes))
    }
}

// ---------------------------------------------------------------------------------------------
// Slice

type SliceAttrs = (Vec<i64>, Vec<i64>, Option<Vec<i64>>);

#[derive(Clone)]
pub(crate) struct Slice {
    /// Opsets 1-9: starts, ends, axes as attributes.
    attrs: Option<SliceAttrs>,
}

/// For each dimension: the first index, the step and the output length.
pub(crate) fn slice_plan(
    shape: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> Result<Vec<(i64, i64, usize)>, PluginError> {
    let rank = shape.len();
    let mut plan: Vec<(i64, i64, usize)> = shape.iter().map(|&d| (0, 1, d)).collect();
    if starts.len() != ends.len() {
        return Err(PluginError::invalid(format!(
            "Slice: {} starts but {} ends",
            starts.len(),
            ends.len()
        )));
    }
    let axes: Vec<usize> = match axes {
        Some(a) => {
            if a.len() != starts.len() {
                return Err(PluginError::invalid(
                    "Slice: axes and starts differ in length",
                ));
            }
            axes_of(a, rank, "Slice axes")?
        }
        None => {
            if starts.len() > rank {
                return Err(PluginError::invalid(format!(
                    "Slice: {} starts for rank {rank}",
                    starts.len()
                )));
            }
            (0..starts.len()).collect()
        }
    };
    if let Some(s) = steps {
        if s.len() != starts.len() {
            return Err(PluginError::invalid(
                "Slice: steps and starts differ in length",
            ));
        }
    }
    for (i, &a) in axes.iter().enumerate() {
        let dim = shape[a] as i64;
        let step = steps.map_or(1, |s| s[i]);
        if step == 0 {
            return Err(PluginError::invalid("Slice: step 0"));
        }
        let mut start = starts[i];
        let mut end = ends[i];
        if start < 0 {
            start = start.saturating_add(dim);
        }
        if end < 0 {
            end = end.saturating_add(dim);
        }
        let len = if step > 0 {
            start = start.clamp(0, dim);
            end = end.clamp(0, dim);
            if end > start {
                (end - start - 1) / step + 1
            } else {
                0
            }
        } else {
            start = start.clamp(0, (dim - 1).max(0));
            end = end.clamp(-1, dim - 1);
            if start > end && dim > 0 {
                (start - end - 1) / (-step) + 1
            } else {
                0
            }
        };
        plan[a] = (start, step, len as usize);
    }
    Ok(plan)
}

impl Kernel for Slice {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Slice")?;
        let (starts, ends, axes, steps) = match &self.attrs {
            Some((s, e, a)) => (s.clone(), e.clone(), a.clone(), None),
            None => (
                input(x, 1, "Slice")?.to_i64s()?,
                input(x, 2, "Slice")?.to_i64s()?,
                optional(x, 3).map(|v| v.to_i64s()).transpose()?,
                optional(x, 4).map(|v| v.to_i64s()).transpose()?,
            ),
        };
        let plan = slice_plan(
            data.shape(),
            &starts,
            &ends,
            axes.as_deref(),
            steps.as_deref(),
        )?;
        let st = strides_of(data.shape());
        let out: Vec<usize> = plan.iter().map(|p| p.2).collect();
        if out.contains(&0) {
            return copy_strided(ctx, data, &out, &vec![0; out.len()], 0);
        }
        let base: isize = plan.iter().zip(&st).map(|(p, s)| p.0 as isize * s).sum();
        let strides: Vec<isize> = plan
            .iter()
            .zip(&st)
            .map(|(p, s)| p.1 as isize * s)
            .collect();
        copy_strided(ctx, data, &out, &strides, base)
    }
}

// ---------------------------------------------------------------------------------------------
// Expand / Tile

#[derive(Clone)]
pub(crate) struct Expand;

impl Kernel for Expand {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Expand")?;
        let target = dims(&input(x, 1, "Expand")?.to_i64s()?, "Expand shape")?;
        let out = broadcast_shapes(&[data.shape(), &target])
            .map_err(|e| PluginError::invalid(format!("Expand: {}", e.message)))?;
        let strides: Vec<isize> = broadcast_strides(data.shape(), &out)
            .into_iter()
            .map(|s| s as isize)
            .collect();
        copy_strided(ctx, data, &out, &strides, 0)
    }
}

#[derive(Clone)]
pub(crate) struct Tile;

impl Kernel for Tile {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Tile")?;
        let reps = dims(&input(x, 1, "Tile")?.to_i64s()?, "Tile repeats")?;
        if reps.len() != data.rank() {
            return Err(PluginError::invalid(format!(
                "Tile: {} repeats for rank {}",
                reps.len(),
                data.rank()
            )));
        }
        // The output, viewed as [r0, d0, r1, d1, ...], reads the input with 0 strides on r_i.
        let st = strides_of(data.shape());
        let mut vshape = Vec::with_capacity(2 * reps.len());
        let mut vstrides = Vec::with_capacity(2 * reps.len());
        for ((&r, &d), &s) in reps.iter().zip(data.shape()).zip(&st) {
            vshape.extend([r, d]);
            vstrides.extend([0, s]);
        }
        // Checked: repeats are data (the host then refuses outputs past its limit).
        let out = reps
            .iter()
            .zip(data.shape())
            .map(|(&r, &d)| numel(&[r, d]))
            .collect::<Result<Vec<_>, _>>()?;
        fn run<T: Elem>(
            ctx: &KernelContext<'_>,
            x: &TensorView<'_>,
            out: &[usize],
            vshape: &[usize],
            vstrides: &[isize],
        ) -> Result<(), PluginError> {
            let src = T::slice(x)?;
            // The strided copy writes every element: not zeroed first.
            let dst = T::slice_mut(output_written(ctx, 0, x.dtype, out)?)?;
            strided_copy(ctx, src, dst, vshape, vstrides, 0)
        }
        by_elem!(data.dtype, run(ctx, data, &out, &vshape, &vstrides))
    }
}

// ---------------------------------------------------------------------------------------------
// Pad

#[derive(Clone, Copy, PartialEq, Debug)]
enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

#[derive(Clone)]
pub(crate) struct Pad {
    mode: PadMode,
    /// Opsets 2-10: pads and the constant value are attributes.
    attrs: Option<(Vec<i64>, f32)>,
}

/// The output extent of an axis of `dim` padded by (`begin`, `end`), checked: the pads are
/// data.
fn pad_extent(dim: usize, begin: i64, end: i64, mode: PadMode) -> Result<usize, PluginError> {
    let out = (dim as i128) + (begin as i128) + (end as i128);
    if out < 0 {
        return Err(PluginError::invalid(format!(
            "Pad: pads ({begin}, {end}) remove more than dimension {dim}"
        )));
    }
    if dim == 0 && out > 0 && mode != PadMode::Constant {
        return Err(PluginError::invalid(format!(
            "Pad: {mode:?} padding of an empty dimension"
        )));
    }
    usize::try_from(out).map_err(|_| {
        PluginError::new(
            ErrorCode::ResourceExhausted,
            format!("Pad: pads ({begin}, {end}) on dimension {dim} overflow"),
        )
    })
}

/// The source index along one axis for each of its `out` output indices (`None`: the
/// constant). As long as the padded axis: allocated fallibly. In i128, so that no pad
/// overflows.
fn pad_map(
    dim: usize,
    begin: i64,
    out: usize,
    mode: PadMode,
) -> Result<Vec<Option<usize>>, PluginError> {
    let d = dim as i128;
    let mut map = try_with_capacity(out)?;
    for o in 0..out {
        let i = o as i128 - begin as i128;
        let j = if (0..d).contains(&i) {
            Some(i)
        } else if mode == PadMode::Constant || d == 0 {
            // (`pad_extent` refused other modes on an empty dimension.)
            None
        } else {
            Some(match mode {
                PadMode::Edge => i.clamp(0, d - 1),
                PadMode::Wrap => i.rem_euclid(d),
                _ if d == 1 => 0,
                _ => {
                    let p = 2 * (d - 1);
                    let m = i.rem_euclid(p);
                    if m >= d {
                        p - m
                    } else {
                        m
                    }
                }
            })
        };
        map.push(j.map(|j| j as usize));
    }
    Ok(map)
}

fn pad_run<T: Elem>(
    ctx: &KernelContext<'_>,
    x: &TensorView<'_>,
    (pads, mode): (&[(i64, i64)], PadMode),
    value: Option<&TensorView<'_>>,
    value_bytes: &[u8],
) -> Result<(), PluginError> {
    let fill = match value {
        Some(v) if !v.is_empty() => T::slice(v)?[0].clone(),
        _ => T::from_le(value_bytes).unwrap_or_else(T::zero),
    };
    let src = T::slice(x)?;
    let out_shape = x
        .shape()
        .iter()
        .zip(pads)
        .map(|(&d, &(b, e))| pad_extent(d, b, e, mode))
        .collect::<Result<Vec<_>, _>>()?;
    // The output before the index maps: the host refuses sizes past its limit. Every element
    // is written below (a run of X, a mapped element or the fill): not zeroed first, but for
    // strings, whose slots must hold strings.
    let dst = T::slice_mut(output_written(ctx, 0, x.dtype, &out_shape)?)?;
    if dst.is_empty() {
        return Ok(());
    }
    let maps = x
        .shape()
        .iter()
        .zip(pads)
        .zip(&out_shape)
        .map(|((&d, &(b, _)), &out)| pad_map(d, b, out, mode))
        .collect::<Result<Vec<_>, _>>()?;
    let rank = maps.len();
    if rank == 0 {
        dst.clone_from_slice(src);
        return Ok(());
    }
    let st = strides_of(x.shape());
    let last = &maps[rank - 1];
    let outer_shape = &out_shape[..rank - 1];
    // The output columns `lo..hi` that take X's columns in order, whatever the mode (those
    // of `begin + i` for i in X's row): copied as a run, not element by element through the
    // map (8x64x56x56 padded by one: 3.2x ONNX Runtime's time so).
    let (d_last, begin) = (x.shape()[rank - 1] as i128, pads[rank - 1].0 as i128);
    let clip = |v: i128| v.clamp(0, last.len() as i128) as usize;
    let lo = clip(begin);
    let hi = clip(begin + d_last).max(lo);
    let first = (lo as i128 - begin) as usize;
    par_units(ctx, dst, last.len(), |row, out| {
        // The source offset of this row's start, or None when the row is all padding.
        let mut rem = row;
        let mut base = Some(0usize);
        for d in (0..rank - 1).rev() {
            let o = rem % outer_shape[d];
            rem /= outer_shape[d];
            // Checked: an empty X has saturated strides, and its rows are all padding.
            base = match (base, maps[d][o]) {
                (Some(b), Some(i)) => i.checked_mul(st[d] as usize).and_then(|v| b.checked_add(v)),
                _ => None,
            };
        }
        match base {
            None => out.fill(fill.clone()),
            Some(b) => {
                let mapped = |o: &mut T, m: &Option<usize>| {
                    *o = match m {
                        Some(i) => src[b + i].clone(),
                        None => fill.clone(),
                    };
                };
                let (head, rest) = out.split_at_mut(lo);
                let (run, tail) = rest.split_at_mut(hi - lo);
                head.iter_mut()
                    .zip(&last[..lo])
                    .for_each(|(o, m)| mapped(o, m));
                // (Checked: with an empty row, `first` may lie past X.)
                match src.get(b + first..b + first + run.len()) {
                    Some(from) => run.clone_from_slice(from),
                    None => run
                        .iter_mut()
                        .zip(&last[lo..hi])
                        .for_each(|(o, m)| mapped(o, m)),
                }
                tail.iter_mut()
                    .zip(&last[hi..])
                    .for_each(|(o, m)| mapped(o, m));
            }
        }
    })
}

impl Kernel for Pad {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Pad")?;
        let rank = data.rank();
        let (pads, value, value_f) = match &self.attrs {
            Some((p, v)) => (p.clone(), None, *v),
            None => (input(x, 1, "Pad")?.to_i64s()?, optional(x, 2), 0.0),
        };
        let axes = match optional(x, 3) {
            Some(a) if self.attrs.is_none() => axes_of(&a.to_i64s()?, rank, "Pad axes")?,
            _ => (0..rank).collect(),
        };
        if pads.len() != 2 * axes.len() {
            return Err(PluginError::invalid(format!(
                "Pad: {} pads for {} axes",
                pads.len(),
                axes.len()
            )));
        }
        let mut full = vec![(0i64, 0i64); rank];
        let k = axes.len();
        for (i, &a) in axes.iter().enumerate() {
            full[a] = (pads[i], pads[k + i]);
        }
        let value_bytes = if data.dtype == DType::String {
            Vec::new()
        } else {
            scalar_bytes(data.dtype, value_f as f64)?
        };
        by_elem!(
            data.dtype,
            pad_run(ctx, data, (&full, self.mode), value, &value_bytes)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// DepthToSpace / SpaceToDepth

#[derive(Clone)]
pub(crate) struct DepthToSpace {
    block: usize,
    crd: bool,
}

impl Kernel for DepthToSpace {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "DepthToSpace")?;
        let &[n, c, h, w] = data.shape() else {
            return Err(PluginError::invalid(format!(
                "DepthToSpace: input must be 4-D, is {:?}",
                data.shape()
            )));
        };
        let b = self.block;
        // Checked: the blocksize is an attribute.
        let bb = b
            .checked_mul(b)
            .filter(|&bb| bb > 0 && c.is_multiple_of(bb));
        let Some(bb) = bb else {
            return Err(PluginError::invalid(format!(
                "DepthToSpace: {c} channels do not divide by blocksize² ({b}²)"
            )));
        };
        let c2 = c / bb;
        let out = [n, c2, numel(&[h, b])?, numel(&[w, b])?];
        if self.crd {
            copy_permuted(ctx, data, &[n, c2, b, b, h, w], &[0, 1, 4, 2, 5, 3], &out)
        } else {
            copy_permuted(ctx, data, &[n, b, b, c2, h, w], &[0, 3, 4, 1, 5, 2], &out)
        }
    }
}

#[derive(Clone)]
pub(crate) struct SpaceToDepth {
    block: usize,
    crd: bool,
}

impl Kernel for SpaceToDepth {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "SpaceToDepth")?;
        let &[n, c, h, w] = data.shape() else {
            return Err(PluginError::invalid(format!(
                "SpaceToDepth: input must be 4-D, is {:?}",
                data.shape()
            )));
        };
        let b = self.block;
        if b == 0 || !h.is_multiple_of(b) || !w.is_multiple_of(b) {
            return Err(PluginError::invalid(format!(
                "SpaceToDepth: {h}x{w} does not divide by blocksize {b}"
            )));
        }
        // DCR: output channel (b1 * b + b2) * c + ci; CRD: ci * b * b + b1 * b + b2.
        let perm: &[usize] = if self.crd {
            &[0, 1, 3, 5, 2, 4]
        } else {
            &[0, 3, 5, 1, 2, 4]
        };
        copy_permuted(
            ctx,
            data,
            &[n, c, h / b, b, w / b, b],
            perm,
            &[n, numel(&[c, b, b])?, h / b, w / b],
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Trilu

#[derive(Clone)]
pub(crate) struct Trilu {
    upper: bool,
}

fn trilu_run<T: Elem>(
    ctx: &KernelContext<'_>,
    x: &TensorView<'_>,
    upper: bool,
    k: i64,
) -> Result<(), PluginError> {
    let src = T::slice(x)?;
    let r = x.rank();
    let (rows, cols) = (x.shape()[r - 2], x.shape()[r - 1]);
    let dst = T::slice_mut(ctx.output(0, x.dtype, x.shape())?)?;
    par_units(ctx, dst, cols, |u, out| {
        let i = (u % rows) as i64;
        let s = &src[u * cols..(u + 1) * cols];
        for (j, (o, v)) in out.iter_mut().zip(s).enumerate() {
            let j = j as i64;
            let keep = if upper { j - i >= k } else { j - i <= k };
            if keep {
                *o = v.clone();
            }
        }
    })
}

impl Kernel for Trilu {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Trilu")?;
        if data.rank() < 2 {
            return Err(PluginError::invalid("Trilu: input must have rank >= 2"));
        }
        let k = match optional(x, 1) {
            Some(v) => scalar_int(v, "Trilu k")?,
            None => 0,
        };
        by_elem!(data.dtype, trilu_run(ctx, data, self.upper, k))
    }
}

// ---------------------------------------------------------------------------------------------
// ReverseSequence

#[derive(Clone)]
pub(crate) struct ReverseSequence {
    batch_axis: i64,
    time_axis: i64,
}

fn reverse_run<T: Elem>(
    ctx: &KernelContext<'_>,
    x: &TensorView<'_>,
    bax: usize,
    tax: usize,
    lens: &[usize],
) -> Result<(), PluginError> {
    let src = T::slice(x)?;
    let shape = x.shape();
    let st = strides_of(shape);
    let (tn, ts, bn, bs) = (shape[tax], st[tax] as usize, shape[bax], st[bax] as usize);
    let dst = T::slice_mut(ctx.output(0, x.dtype, shape)?)?;
    ctx.parallel_chunks(dst, GRAIN, |start, chunk| {
        for (k, o) in chunk.iter_mut().enumerate() {
            let i = start + k;
            let t = (i / ts) % tn;
            let b = (i / bs) % bn;
            let len = lens[b];
            let s = if t < len {
                i + (len - 1 - t) * ts - t * ts
            } else {
                i
            };
            *o = src[s].clone();
        }
    })
}

impl Kernel for ReverseSequence {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "ReverseSequence")?;
        let lens = input(x, 1, "ReverseSequence")?.to_i64s()?;
        if data.rank() < 2 {
            return Err(PluginError::invalid(
                "ReverseSequence: input must have rank >= 2",
            ));
        }
        let bax = normalize_axis(self.batch_axis, 2)?;
        let tax = normalize_axis(self.time_axis, 2)?;
        if bax == tax {
            return Err(PluginError::invalid(
                "ReverseSequence: batch_axis equals time_axis",
            ));
        }
        let (bn, tn) = (data.shape()[bax], data.shape()[tax]);
        if lens.len() != bn {
            return Err(PluginError::invalid(format!(
                "ReverseSequence: {} sequence_lens for batch size {bn}",
                lens.len()
            )));
        }
        let lens: Vec<usize> = lens
            .iter()
            .map(|&l| {
                if (0..=tn as i64).contains(&l) {
                    Ok(l as usize)
                } else {
                    Err(PluginError::invalid(format!(
                        "ReverseSequence: sequence length {l} outside [0, {tn}]"
                    )))
                }
            })
            .collect::<Result<_, _>>()?;
        by_elem!(data.dtype, reverse_run(ctx, data, bax, tax, &lens))
    }
}

// ---------------------------------------------------------------------------------------------

pub(crate) fn register(r: &mut Registrar) {
    let any: &[DType] = &DType::ALL;
    let t = |op: &str, since: i32, end: i32| {
        KernelDesc::onnx(op, since, end)
            .constraint("T", any)
            .outputs(&["T"])
    };
    reg(r, t("Reshape", 1, 4).inputs(&["T"]), |n| {
        Ok(Reshape {
            allowzero: false,
            attr_shape: Some(n.ints("shape")?.unwrap_or_default()),
        })
    });
    reg(
        r,
        t("Reshape", 5, OPEN_END).inputs(&["T", "tensor(int64)"]),
        |n| {
            Ok(Reshape {
                allowzero: n.opset >= 14 && n.int_or("allowzero", 0)? != 0,
                attr_shape: None,
            })
        },
    );
    reg(r, t("Flatten", 1, OPEN_END).inputs(&["T"]), |n| {
        Ok(Flatten {
            axis: n.int_or("axis", 1)?,
        })
    });
    reg(r, t("Squeeze", 1, 12).inputs(&["T"]), |n| {
        Ok(Squeeze {
            attr_axes: n.ints("axes")?,
        })
    });
    reg(
        r,
        t("Squeeze", 13, OPEN_END).inputs(&["T", "tensor(int64)"]),
        |_| Ok(Squeeze { attr_axes: None }),
    );
    reg(r, t("Unsqueeze", 1, 12).inputs(&["T"]), |n| {
        Ok(Unsqueeze {
            attr_axes: Some(
                n.ints("axes")?.ok_or_else(|| {
                    PluginError::invalid("Unsqueeze: attribute 'axes' is required")
                })?,
            ),
        })
    });
    reg(
        r,
        t("Unsqueeze", 13, OPEN_END).inputs(&["T", "tensor(int64)"]),
        |_| Ok(Unsqueeze { attr_axes: None }),
    );
    reg(r, t("Transpose", 1, OPEN_END).inputs(&["T"]), |n| {
        Ok(Transpose {
            perm: n.ints("perm")?,
        })
    });
    reg(r, t("Concat", 1, OPEN_END).inputs(&["T"]), |n| {
        let axis = match (n.opset, n.attr("axis")) {
            (o, None) if o < 4 => 1,
            (_, None) => return Err(PluginError::invalid("Concat: attribute 'axis' is required")),
            _ => n.int_or("axis", 0)?,
        };
        Ok(Concat { axis })
    });
    reg(
        r,
        t("Split", 1, OPEN_END).inputs(&["T", "tensor(int64)"]),
        |n| {
            Ok(Split {
                axis: n.int_or("axis", 0)?,
                attr_split: if n.opset < 13 { n.ints("split")? } else { None },
                num_outputs: if n.opset >= 18 {
                    n.attr("num_outputs")
                        .map(|_| n.int_or("num_outputs", 0))
                        .transpose()?
                } else {
                    None
                },
                opset: n.opset,
            })
        },
    );
    reg(r, t("Slice", 1, 9).inputs(&["T"]), |n| {
        let req = |name: &str| {
            n.ints(name)?.ok_or_else(|| {
                PluginError::invalid(format!("Slice: attribute '{name}' is required"))
            })
        };
        Ok(Slice {
            attrs: Some((req("starts")?, req("ends")?, n.ints("axes")?)),
        })
    });
    reg(
        r,
        t("Slice", 10, OPEN_END).inputs(&["T", "Tind", "Tind", "Tind", "Tind"]),
        |_| Ok(Slice { attrs: None }),
    );
    reg(
        r,
        t("Expand", 8, OPEN_END).inputs(&["T", "tensor(int64)"]),
        |_| Ok(Expand),
    );
    reg(
        r,
        t("Tile", 6, OPEN_END).inputs(&["T", "tensor(int64)"]),
        |_| Ok(Tile),
    );
    let pad_mode = |n: &NodeInfo<'_>| -> Result<PadMode, PluginError> {
        match n.string_or("mode", "constant")?.as_str() {
            "constant" => Ok(PadMode::Constant),
            "reflect" => Ok(PadMode::Reflect),
            "edge" => Ok(PadMode::Edge),
            "wrap" if n.opset >= 19 => Ok(PadMode::Wrap),
            m => Err(PluginError::invalid(format!("Pad: unknown mode '{m}'"))),
        }
    };
    reg(r, t("Pad", 2, 10).inputs(&["T"]), move |n| {
        Ok(Pad {
            mode: pad_mode(n)?,
            attrs: Some((
                n.ints("pads")?
                    .ok_or_else(|| PluginError::invalid("Pad: attribute 'pads' is required"))?,
                n.float_or("value", 0.0)?,
            )),
        })
    });
    reg(
        r,
        t("Pad", 11, OPEN_END).inputs(&["T", "tensor(int64)", "T", "Tind"]),
        move |n| {
            Ok(Pad {
                mode: pad_mode(n)?,
                attrs: None,
            })
        },
    );
    let block = |n: &NodeInfo<'_>| -> Result<usize, PluginError> {
        let b = n.int_or("blocksize", 0)?;
        if b <= 0 {
            return Err(PluginError::invalid(format!(
                "{}: attribute 'blocksize' must be positive, is {b}",
                n.op_type
            )));
        }
        Ok(b as usize)
    };
    reg(r, t("DepthToSpace", 1, OPEN_END).inputs(&["T"]), move |n| {
        let crd = match n.string_or("mode", "DCR")?.as_str() {
            "DCR" => false,
            "CRD" if n.opset >= 11 => true,
            m => {
                return Err(PluginError::invalid(format!(
                    "DepthToSpace: unknown mode '{m}'"
                )))
            }
        };
        Ok(DepthToSpace {
            block: block(n)?,
            crd,
        })
    });
    reg(r, t("SpaceToDepth", 1, OPEN_END).inputs(&["T"]), move |n| {
        let crd = match n.string_or("mode", "DCR")?.as_str() {
            "DCR" => false,
            "CRD" => true,
            m => {
                return Err(PluginError::invalid(format!(
                    "SpaceToDepth: unknown mode '{m}'"
                )))
            }
        };
        Ok(SpaceToDepth {
            block: block(n)?,
            crd,
        })
    });
    reg(
        r,
        t("Trilu", 14, OPEN_END).inputs(&["T", "tensor(int64)"]),
        |n| {
            Ok(Trilu {
                upper: n.int_or("upper", 1)? != 0,
            })
        },
    );
    reg(
        r,
        t("ReverseSequence", 10, OPEN_END).inputs(&["T", "tensor(int64)"]),
        |n| {
            Ok(ReverseSequence {
                batch_axis: n.int_or("batch_axis", 1)?,
                time_axis: n.int_or("time_axis", 0)?,
            })
        },
    );
}
