//! Indexed reads and writes: Gather, GatherElements, GatherND, ScatterElements (and the old
//! Scatter), ScatterND, OneHot, NonZero, Compress.

use super::common::*;
use crate::util::{normalize_axis, numel, product_sat};
use opreg_sdk::numeric::{Arith, Num};
use opreg_sdk::{alloc::try_with_capacity, prelude::*};

/// Indices in `[-dim, dim)` as positions in `[0, dim)`.
fn norm_indices(raw: &[i64], dim: usize, what: &str) -> Result<Vec<usize>, PluginError> {
    let d = dim as i64;
    raw.iter()
        .map(|&i| {
            if i < -d || i >= d {
                Err(PluginError::invalid(format!(
                    "{what}: index {i} out of range for dimension {dim}"
                )))
            } else {
                Ok(if i < 0 { i + d } else { i } as usize)
            }
        })
        .collect()
}

fn axis_of(axis: i64, rank: usize, what: &str) -> Result<usize, PluginError> {
    normalize_axis(axis, rank).map_err(|e| PluginError::invalid(format!("{what}: {}", e.message)))
}

// ---------------------------------------------------------------------------------------------
// Gather (and Compress, which gathers the selected slices)

/// Output 0: `data` gathered along `axis` at `idx` (already in range), which has `idx_shape`.
fn gather_run<T: Elem>(
    ctx: &KernelContext<'_>,
    data: &TensorView<'_>,
    axis: usize,
    idx: &[usize],
    idx_shape: &[usize],
) -> Result<(), PluginError> {
    let src = T::slice(data)?;
    let shape = data.shape();
    let dim = shape[axis];
    // Saturating: exact whenever the output has elements (then so has `data`).
    let inner = product_sat(&shape[axis + 1..]);
    let mut out_shape = shape[..axis].to_vec();
    out_shape.extend_from_slice(idx_shape);
    out_shape.extend_from_slice(&shape[axis + 1..]);
    // Every element is one of `data`'s, copied below.
    let dst = T::slice_mut(output_written(ctx, 0, data.dtype, &out_shape)?)?;
    let n = idx.len();
    par_units(ctx, dst, inner, |u, out| {
        let (o, j) = (u / n, u % n);
        let s = (o * dim + idx[j]) * inner;
        out.clone_from_slice(&src[s..s + inner]);
    })
}

#[derive(Clone)]
pub(crate) struct Gather {
    axis: i64,
}

impl Kernel for Gather {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Gather")?;
        let indices = input(x, 1, "Gather")?;
        let axis = axis_of(self.axis, data.rank(), "Gather axis")?;
        let idx = norm_indices(&indices.to_i64s()?, data.shape()[axis], "Gather")?;
        by_elem!(
            data.dtype,
            gather_run(ctx, data, axis, &idx, indices.shape())
        )
    }
}

#[derive(Clone)]
pub(crate) struct Compress {
    axis: Option<i64>,
}

impl Kernel for Compress {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Compress")?;
        let cond = input(x, 1, "Compress")?;
        let cond: Vec<bool> = match cond.dtype {
            DType::Bool => cond.as_bytes()?.iter().map(|&b| b != 0).collect(),
            _ => ints_of(cond, "Compress condition")?
                .iter()
                .map(|&b| b != 0)
                .collect(),
        };
        let flat = [data.len()];
        let (shape, axis): (&[usize], usize) = match self.axis {
            None => (&flat, 0),
            Some(a) => (data.shape(), axis_of(a, data.rank(), "Compress axis")?),
        };
        let dim = shape[axis];
        if cond.len() > dim {
            return Err(PluginError::invalid(format!(
                "Compress: condition has {} entries for dimension {dim}",
                cond.len()
            )));
        }
        let sel: Vec<usize> = (0..cond.len()).filter(|&i| cond[i]).collect();
        // Gather from a view of `data` with the (possibly flattened) shape.
        let strides = strides_of(shape);
        // SAFETY: same data and element count as `data`, contiguous row-major strides.
        let view =
            unsafe { TensorView::from_raw(data.dtype, data.device, shape, &strides, data.data) };
        by_elem!(data.dtype, gather_run(ctx, &view, axis, &sel, &[sel.len()]))
    }
}

// ---------------------------------------------------------------------------------------------
// GatherElements

#[derive(Clone)]
pub(crate) struct GatherElements {
    axis: i64,
}

fn gather_elements_run<T: Elem>(
    ctx: &KernelContext<'_>,
    data: &TensorView<'_>,
    idx_shape: &[usize],
    axis: usize,
    idx: &[usize],
) -> Result<(), PluginError> {
    let src = T::slice(data)?;
    let mut st = strides_of(data.shape());
    let axis_stride = st[axis] as usize;
    st[axis] = 0;
    let dst = T::slice_mut(ctx.output(0, data.dtype, idx_shape)?)?;
    ctx.parallel_chunks(dst, GRAIN, |start, chunk| {
        let mut k = 0;
        walk_elems(idx_shape, &st, 0, start, chunk.len(), |off| {
            chunk[k] = src[off as usize + idx[start + k] * axis_stride].clone();
            k += 1;
        });
    })
}

fn check_elements_shapes(
    op: &str,
    data: &[usize],
    idx: &[usize],
    axis: usize,
) -> Result<(), PluginError> {
    if idx.len() != data.len()
        || idx
            .iter()
            .zip(data)
            .enumerate()
            .any(|(d, (&i, &n))| d != axis && i > n)
    {
        return Err(PluginError::invalid(format!(
            "{op}: indices of shape {idx:?} do not fit data of shape {data:?}"
        )));
    }
    Ok(())
}

impl Kernel for GatherElements {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "GatherElements")?;
        let indices = input(x, 1, "GatherElements")?;
        let axis = axis_of(self.axis, data.rank(), "GatherElements axis")?;
        check_elements_shapes("GatherElements", data.shape(), indices.shape(), axis)?;
        let idx = norm_indices(&indices.to_i64s()?, data.shape()[axis], "GatherElements")?;
        by_elem!(
            data.dtype,
            gather_elements_run(ctx, data, indices.shape(), axis, &idx)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// GatherND

#[derive(Clone)]
pub(crate) struct GatherND {
    batch_dims: usize,
}

/// Element offsets into `data` for each index tuple of a GatherND / ScatterND, and the size of
/// the slice each one addresses.
fn nd_offsets(
    op: &str,
    data: &[usize],
    idx_shape: &[usize],
    idx: &[i64],
    b: usize,
) -> Result<(Vec<usize>, usize), PluginError> {
    let q = idx_shape.len();
    let r = data.len();
    let k = *idx_shape
        .last()
        .ok_or_else(|| PluginError::invalid(format!("{op}: indices must have rank >= 1")))?;
    if b >= q || b + k > r || idx_shape[..b] != data[..b] {
        return Err(PluginError::invalid(format!(
            "{op}: indices of shape {idx_shape:?} (batch_dims {b}) do not fit data {data:?}"
        )));
    }
    // Saturating products of data's extents: exact whenever a slice is ever copied.
    let inner = product_sat(&data[b + k..]);
    let batch_block = product_sat(&data[b..]);
    if k == 0 && inner == 0 {
        // No index to check and nothing to move, however many (empty) tuples there are.
        return Ok((Vec::new(), 0));
    }
    let st = strides_of(&data[b..]);
    // With k = 0 the indices are empty whatever their leading extents: the offsets are
    // sized by shapes, not data, so allocated fallibly.
    let tuples = numel(&idx_shape[..q - 1])?;
    let per_batch = product_sat(&idx_shape[b..q - 1]);
    let mut offs = try_with_capacity(tuples)?;
    for n in 0..tuples {
        let mut off = (n / per_batch.max(1)) * batch_block;
        for j in 0..k {
            let dim = data[b + j] as i64;
            let i = idx[n * k + j];
            if i < -dim || i >= dim {
                return Err(PluginError::invalid(format!(
                    "{op}: index {i} out of range for dimension {dim}"
                )));
            }
            off += (if i < 0 { i + dim } else { i }) as usize * st[j] as usize;
        }
        offs.push(off);
    }
    Ok((offs, inner))
}

fn gather_nd_run<T: Elem>(
    ctx: &KernelContext<'_>,
    data: &TensorView<'_>,
    out_shape: &[usize],
    offs: &[usize],
    inner: usize,
) -> Result<(), PluginError> {
    let src = T::slice(data)?;
    let dst = T::slice_mut(ctx.output(0, data.dtype, out_shape)?)?;
    par_units(ctx, dst, inner, |u, out| {
        out.clone_from_slice(&src[offs[u]..offs[u] + inner]);
    })
}

impl Kernel for GatherND {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "GatherND")?;
        let indices = input(x, 1, "GatherND")?;
        let b = self.batch_dims;
        let (offs, inner) = nd_offsets(
            "GatherND",
            data.shape(),
            indices.shape(),
            &indices.to_i64s()?,
            b,
        )?;
        let q = indices.rank();
        let k = indices.shape()[q - 1];
        let mut out_shape = indices.shape()[..q - 1].to_vec();
        out_shape.extend_from_slice(&data.shape()[b + k..]);
        by_elem!(
            data.dtype,
            gather_nd_run(ctx, data, &out_shape, &offs, inner)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// ScatterElements / ScatterND

#[derive(Clone, Copy, PartialEq, Debug)]
enum Reduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

fn reduction(n: &NodeInfo<'_>, max_min_since: i32) -> Result<Reduction, PluginError> {
    match n.string_or("reduction", "none")?.as_str() {
        "none" => Ok(Reduction::None),
        "add" if n.opset >= 16 => Ok(Reduction::Add),
        "mul" if n.opset >= 16 => Ok(Reduction::Mul),
        "max" if n.opset >= max_min_since => Ok(Reduction::Max),
        "min" if n.opset >= max_min_since => Ok(Reduction::Min),
        r => Err(PluginError::invalid(format!(
            "{}: unknown reduction '{r}' at opset {}",
            n.op_type, n.opset
        ))),
    }
}

/// How ScatterElements / ScatterND combine an update `u` into `o`: integers wrap, f16 and bf16
/// compute in f32 and round once, Max / Min give NaN when either side is NaN.
fn combine<T: Num>(red: Reduction) -> impl Fn(&mut T, &T) {
    move |o: &mut T, u: &T| {
        let (a, b) = (o.load(), u.load());
        *o = match red {
            Reduction::None => *u,
            Reduction::Add => T::store(a.add(b)),
            Reduction::Mul => T::store(a.mul(b)),
            Reduction::Max | Reduction::Min if a.is_nan() || b.is_nan() => T::from_f64(f64::NAN),
            Reduction::Max => {
                if b > a {
                    *u
                } else {
                    *o
                }
            }
            Reduction::Min => {
                if b < a {
                    *u
                } else {
                    *o
                }
            }
        }
    }
}

/// Where each update goes, by position.
enum Targets {
    /// ScatterElements: one element offset per update element.
    Elements(Vec<usize>),
    /// ScatterND: one slice offset per index tuple, slices of `inner` elements.
    Slices(Vec<usize>, usize),
}

fn apply<T>(out: &mut [T], upd: &[T], targets: &Targets, f: impl Fn(&mut T, &T)) {
    match targets {
        Targets::Elements(t) => {
            for (&o, u) in t.iter().zip(upd) {
                f(&mut out[o], u);
            }
        }
        Targets::Slices(t, inner) => {
            for (n, &o) in t.iter().enumerate() {
                for (dst, u) in out[o..o + inner]
                    .iter_mut()
                    .zip(&upd[n * inner..(n + 1) * inner])
                {
                    f(dst, u);
                }
            }
        }
    }
}

fn scatter_elem<T: Elem>(
    ctx: &KernelContext<'_>,
    data: &TensorView<'_>,
    upd: &TensorView<'_>,
    targets: &Targets,
) -> Result<(), PluginError> {
    let src = T::slice(data)?;
    let u = T::slice(upd)?;
    let out = T::slice_mut(ctx.output(0, data.dtype, data.shape())?)?;
    copy_all(ctx, src, out)?;
    apply(out, u, targets, |o: &mut T, u: &T| *o = u.clone());
    Ok(())
}

fn scatter_num<T: Num>(
    ctx: &KernelContext<'_>,
    data: &TensorView<'_>,
    upd: &TensorView<'_>,
    targets: &Targets,
    red: Reduction,
) -> Result<(), PluginError> {
    let src = data.as_slice::<T>()?;
    let u = upd.as_slice::<T>()?;
    let out = ctx.output_slice::<T>(0, data.shape())?;
    out.copy_from_slice(src);
    apply(out, u, targets, combine::<T>(red));
    Ok(())
}

fn scatter(
    ctx: &KernelContext<'_>,
    data: &TensorView<'_>,
    upd: &TensorView<'_>,
    targets: &Targets,
    red: Reduction,
) -> Result<(), PluginError> {
    if upd.dtype != data.dtype {
        return Err(PluginError::invalid(format!(
            "updates are {}, data is {}",
            upd.dtype, data.dtype
        )));
    }
    if red == Reduction::None {
        by_elem!(data.dtype, scatter_elem(ctx, data, upd, targets))
    } else {
        opreg_sdk::dispatch!(data.dtype, NUMERIC, |T| scatter_num::<T>(ctx, data, upd, targets, red),
            d => Err(PluginError::unimplemented(format!("arithmetic on {d}"))))
    }
}

#[derive(Clone)]
pub(crate) struct ScatterElements {
    axis: i64,
    red: Reduction,
}

impl Kernel for ScatterElements {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "ScatterElements")?;
        let indices = input(x, 1, "ScatterElements")?;
        let upd = input(x, 2, "ScatterElements")?;
        let axis = axis_of(self.axis, data.rank(), "ScatterElements axis")?;
        check_elements_shapes("ScatterElements", data.shape(), indices.shape(), axis)?;
        if upd.shape() != indices.shape() {
            return Err(PluginError::invalid(format!(
                "ScatterElements: updates {:?} and indices {:?} differ in shape",
                upd.shape(),
                indices.shape()
            )));
        }
        let idx = norm_indices(&indices.to_i64s()?, data.shape()[axis], "ScatterElements")?;
        let mut st = strides_of(data.shape());
        let axis_stride = st[axis] as usize;
        st[axis] = 0;
        let mut targets = Vec::with_capacity(idx.len());
        walk_elems(indices.shape(), &st, 0, 0, idx.len(), |off| {
            targets.push(off as usize + idx[targets.len()] * axis_stride);
        });
        scatter(ctx, data, upd, &Targets::Elements(targets), self.red)
    }
}

#[derive(Clone)]
pub(crate) struct ScatterND {
    red: Reduction,
}

impl Kernel for ScatterND {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "ScatterND")?;
        let indices = input(x, 1, "ScatterND")?;
        let upd = input(x, 2, "ScatterND")?;
        let (offs, inner) = nd_offsets(
            "ScatterND",
            data.shape(),
            indices.shape(),
            &indices.to_i64s()?,
            0,
        )?;
        let q = indices.rank();
        let k = indices.shape()[q - 1];
        let mut want = indices.shape()[..q - 1].to_vec();
        want.extend_from_slice(&data.shape()[k..]);
        if upd.shape() != want.as_slice() {
            return Err(PluginError::invalid(format!(
                "ScatterND: updates have shape {:?}, expected {want:?}",
                upd.shape()
            )));
        }
        scatter(ctx, data, upd, &Targets::Slices(offs, inner), self.red)
    }
}

// ---------------------------------------------------------------------------------------------
// OneHot

#[derive(Clone)]
pub(crate) struct OneHot {
    axis: i64,
    /// Negative indices count from the end since opset 11; before, they select nothing.
    negative: bool,
}

fn one_hot_run<T: Elem>(
    ctx: &KernelContext<'_>,
    values: &TensorView<'_>,
    out_shape: &[usize],
    idx: &[i64],
    depth: usize,
    after: usize,
    negative: bool,
) -> Result<(), PluginError> {
    let v = T::slice(values)?;
    let [off, on] = v else {
        return Err(PluginError::invalid(format!(
            "OneHot: values must hold 2 elements, has {}",
            v.len()
        )));
    };
    let dst = T::slice_mut(ctx.output(0, values.dtype, out_shape)?)?;
    dst.fill(off.clone());
    let d = depth as i64;
    for (p, &i) in idx.iter().enumerate() {
        let i = if i < 0 && negative { i + d } else { i };
        if (0..d).contains(&i) {
            let (outer, inner) = (p / after, p % after);
            dst[(outer * depth + i as usize) * after + inner] = on.clone();
        }
    }
    Ok(())
}

impl Kernel for OneHot {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let indices = input(x, 0, "OneHot")?;
        let depth = scalar_int(input(x, 1, "OneHot")?, "OneHot depth")?;
        let values = input(x, 2, "OneHot")?;
        if depth < 0 {
            return Err(PluginError::invalid(format!("OneHot: depth {depth} < 0")));
        }
        let depth = depth as usize;
        let r = indices.rank() as i64;
        if self.axis < -(r + 1) || self.axis > r {
            return Err(PluginError::invalid(format!(
                "OneHot: axis {} out of range for output rank {}",
                self.axis,
                r + 1
            )));
        }
        let axis = if self.axis < 0 {
            self.axis + r + 1
        } else {
            self.axis
        } as usize;
        let mut out_shape = indices.shape().to_vec();
        out_shape.insert(axis, depth);
        // Saturating: exact whenever the indices have elements.
        let after = product_sat(&indices.shape()[axis..]);
        let idx = ints_of(indices, "OneHot indices")?;
        by_elem!(
            values.dtype,
            one_hot_run(ctx, values, &out_shape, &idx, depth, after, self.negative)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// NonZero

#[derive(Clone)]
pub(crate) struct NonZero;

impl Kernel for NonZero {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "NonZero")?;
        let hits: Vec<usize> = if data.dtype == DType::String {
            data.as_strings()?
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .map(|(i, _)| i)
                .collect()
        } else {
            let size = data.dtype.size();
            data.as_bytes()?
                .chunks_exact(size)
                .enumerate()
                .filter(|(_, b)| is_nonzero(data.dtype, b))
                .map(|(i, _)| i)
                .collect()
        };
        // A scalar counts as a 1-D tensor of one element (as numpy and ONNX Runtime do).
        let shape: Vec<usize> = if data.rank() == 0 {
            vec![1]
        } else {
            data.shape().to_vec()
        };
        let r = shape.len();
        let n = hits.len();
        let out = ctx.output_slice::<i64>(0, &[r, n])?;
        for (j, &h) in hits.iter().enumerate() {
            let mut rem = h;
            for d in (0..r).rev() {
                out[d * n + j] = (rem % shape[d]) as i64;
                rem /= shape[d];
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

pub(crate) fn register(r: &mut Registrar) {
    let any: &[DType] = &DType::ALL;
    let ind: &[DType] = &[DType::I32, DType::I64];
    let t = |op: &str, since: i32, end: i32| {
        KernelDesc::onnx(op, since, end)
            .constraint("T", any)
            .constraint("Tind", ind)
            .outputs(&["T"])
    };
    reg(r, t("Gather", 1, OPEN_END).inputs(&["T", "Tind"]), |n| {
        Ok(Gather {
            axis: n.int_or("axis", 0)?,
        })
    });
    reg(
        r,
        t("GatherElements", 11, OPEN_END).inputs(&["T", "Tind"]),
        |n| {
            Ok(GatherElements {
                axis: n.int_or("axis", 0)?,
            })
        },
    );
    reg(
        r,
        t("GatherND", 11, OPEN_END).inputs(&["T", "tensor(int64)"]),
        |n| {
            let b = if n.opset >= 12 {
                n.int_or("batch_dims", 0)?
            } else {
                0
            };
            let batch_dims = usize::try_from(b).map_err(|_| {
                PluginError::invalid(format!("GatherND: batch_dims {b} is negative"))
            })?;
            Ok(GatherND { batch_dims })
        },
    );
    for (op, since) in [("Scatter", 9), ("ScatterElements", 11)] {
        let end = if op == "Scatter" { 10 } else { OPEN_END };
        reg(r, t(op, since, end).inputs(&["T", "Tind", "T"]), |n| {
            Ok(ScatterElements {
                axis: n.int_or("axis", 0)?,
                red: reduction(n, 18)?,
            })
        });
    }
    reg(
        r,
        t("ScatterND", 11, OPEN_END).inputs(&["T", "tensor(int64)", "T"]),
        |n| {
            Ok(ScatterND {
                red: reduction(n, 18)?,
            })
        },
    );
    reg(
        r,
        KernelDesc::onnx("OneHot", 9, OPEN_END)
            .constraint("T3", any)
            .inputs(&["T1", "T2", "T3"])
            .outputs(&["T3"]),
        |n| {
            Ok(OneHot {
                axis: n.int_or("axis", -1)?,
                negative: n.opset >= 11,
            })
        },
    );
    reg(
        r,
        KernelDesc::onnx("NonZero", 9, OPEN_END)
            .constraint("T", any)
            .inputs(&["T"])
            .outputs(&["tensor(int64)"]),
        |_| Ok(NonZero),
    );
    reg(
        r,
        KernelDesc::onnx("Compress", 9, OPEN_END)
            .constraint("T", any)
            .inputs(&["T", "tensor(bool)"])
            .outputs(&["T"]),
        |n| {
            Ok(Compress {
                axis: n.attr("axis").map(|_| n.int_or("axis", 0)).transpose()?,
            })
        },
    );
}
