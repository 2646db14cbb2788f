//! Reductions: ReduceSum/Mean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare, ArgMax, ArgMin,
//! CumSum, TopK.

use crate::nn::{register_versions, Factory};
use crate::simd::simd_fn;
use crate::util::{
    input, normalize_axis, not_implemented_for, optional, product_sat, row_major_strides,
    walk_offsets,
};
use opreg_sdk::numeric::{Arith, Scalar};
use opreg_sdk::{alloc::try_with_capacity, prelude::*};

/// The identity of a max in the accumulator: −∞ for floats, the element type's lowest value
/// otherwise.
#[inline(always)]
fn lowest<T: Scalar>() -> T::Wide {
    if T::IS_FLOAT {
        <T::Wide as Scalar>::from_f64(f64::NEG_INFINITY)
    } else {
        T::LOWEST.widen()
    }
}

/// The identity of a min in the accumulator: +∞ for floats, the element type's highest value
/// otherwise.
#[inline(always)]
fn highest<T: Scalar>() -> T::Wide {
    if T::IS_FLOAT {
        <T::Wide as Scalar>::from_f64(f64::INFINITY)
    } else {
        T::MAX.widen()
    }
}

// The reductions' own type sets, narrower than the SDK's families: the floats with i32 and
// i64 (what ONNX Runtime implements for them), bool for ReduceMax / ReduceMin from opset 20,
// u64 for TopK. The dispatch lists above match their union.
const NUMS_AND_BOOL: &[DType] = &[
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::I64,
    DType::Bool,
];
const NUMS_AND_U64: &[DType] = &[
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::I64,
    DType::U64,
];

const NUMS: &[DType] = &[
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::I64,
];

/// `outer x n x inner` around `axis` (saturating products: see [`product_sat`]).
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        product_sat(&shape[..axis]),
        shape[axis],
        product_sat(&shape[axis + 1..]),
    )
}

/// Pairwise summation over a stream of values: runs of `BLOCK` values are summed plainly and
/// the run sums merged like a binary counter, so rounding error grows with log(n) rather than
/// n (a plain f32 running sum of ones stops growing at 2^24).
struct Pairwise<A> {
    run: A,
    in_run: usize,
    /// `levels[l]` holds the sum of `2^l` runs, when set.
    levels: [Option<A>; usize::BITS as usize],
}

impl<A: Arith> Pairwise<A> {
    const BLOCK: usize = 64;

    fn new() -> Self {
        Pairwise {
            run: A::ZERO,
            in_run: 0,
            levels: [None; usize::BITS as usize],
        }
    }

    #[inline(always)]
    fn add(&mut self, v: A) {
        self.run = self.run.add(v);
        self.in_run += 1;
        if self.in_run == Self::BLOCK {
            let carry = std::mem::replace(&mut self.run, A::ZERO);
            self.in_run = 0;
            self.add_run(carry);
        }
    }

    /// Adds the sum of one whole run of `BLOCK` values; only between whole runs (no value
    /// added since the last run closed).
    #[inline(always)]
    fn add_run(&mut self, run: A) {
        debug_assert_eq!(self.in_run, 0);
        let mut carry = run;
        for slot in self.levels.iter_mut() {
            match slot.take() {
                Some(s) => carry = s.add(carry),
                None => {
                    *slot = Some(carry);
                    break;
                }
            }
        }
    }

    /// The total: the partial sums from the smallest up.
    fn sum(self) -> A {
        self.levels
            .iter()
            .flatten()
            .fold(self.run, |acc, &s| acc.add(s))
    }
}

fn axis_err(op: &str, e: PluginError) -> PluginError {
    PluginError::invalid(format!("{op}: {}", e.message))
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReduceKind {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    LogSum,
    LogSumExp,
    SumSquare,
}

#[derive(Clone)]
struct Reduce {
    op: &'static str,
    kind: ReduceKind,
    keepdims: bool,
    noop_with_empty_axes: bool,
    /// `Some` when the opset takes axes as an attribute (absent attribute: every axis).
    attr_axes: Option<Vec<i64>>,
    axes_from_input: bool,
}

fn reduce_factory(
    node: &NodeInfo<'_>,
    op: &'static str,
    kind: ReduceKind,
) -> Result<Box<dyn Kernel>, PluginError> {
    let input_since = if kind == ReduceKind::Sum { 13 } else { 18 };
    let axes_from_input = node.opset >= input_since;
    Ok(Box::new(Reduce {
        op,
        kind,
        keepdims: node.int_or("keepdims", 1)? != 0,
        noop_with_empty_axes: node.int_or("noop_with_empty_axes", 0)? != 0,
        attr_axes: if axes_from_input {
            None
        } else {
            node.ints("axes")?
        },
        axes_from_input,
    }))
}

impl Reduce {
    /// The reduced axes as a mask; `None` means no reduction at all (noop).
    fn axes(
        &self,
        inputs: &[TensorView<'_>],
        rank: usize,
    ) -> Result<Option<Vec<bool>>, PluginError> {
        let axes = if self.axes_from_input {
            match optional(inputs, 1) {
                Some(t) => t.to_i64s().map_err(|e| {
                    PluginError::invalid(format!("{}: input 'axes': {}", self.op, e.message))
                })?,
                None => Vec::new(),
            }
        } else {
            self.attr_axes.clone().unwrap_or_default()
        };
        if axes.is_empty() {
            if self.axes_from_input && self.noop_with_empty_axes {
                return Ok(None);
            }
            return Ok(Some(vec![true; rank]));
        }
        let mut mask = vec![false; rank];
        for &a in &axes {
            let a = normalize_axis(a, rank).map_err(|e| axis_err(self.op, e))?;
            if mask[a] {
                return Err(PluginError::invalid(format!(
                    "{}: axis {a} appears twice in axes {axes:?}",
                    self.op
                )));
            }
            mask[a] = true;
        }
        Ok(Some(mask))
    }

    fn run<T: Scalar>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input(self.op, inputs, 0, "X")?;
        let xs = xv.shape();
        let x = xv.as_slice::<T>()?;
        let rank = xs.len();
        let mask = self
            .axes(inputs, rank)?
            .unwrap_or_else(|| vec![false; rank]);
        // Output shape with reduced dims kept as 1; the reduced sub-shape.
        let kept: Vec<usize> = (0..rank).map(|d| if mask[d] { 1 } else { xs[d] }).collect();
        let red: Vec<usize> = (0..rank).map(|d| if mask[d] { xs[d] } else { 1 }).collect();
        let out_shape: Vec<usize> = if self.keepdims {
            kept.clone()
        } else {
            (0..rank).filter(|&d| !mask[d]).map(|d| xs[d]).collect()
        };
        let strides = row_major_strides(xs);
        // Saturating: only an empty input's reduced extents can overflow, and then no output
        // element reads them.
        let count = product_sat(&red);
        if count == 0
            && matches!(self.kind, ReduceKind::Max | ReduceKind::Min)
            && is_integer(T::DTYPE)
        {
            return Err(PluginError::invalid(format!(
                "{}: reducing an empty set of integers has no value",
                self.op
            )));
        }
        let y = ctx.output_slice::<T>(0, &out_shape)?;
        let kind = self.kind;
        let grain = (16 * 1024 / count.max(1)).max(1);
        // The reduced extents after every kept one (size-1 extents aside): each output reduces
        // one contiguous run of X, summed in lanes that vectorize (ReduceMean over a whole
        // image, over H x W in NCHW, over the last axis).
        let mut extents = (0..rank).filter(|&d| xs[d] != 1).map(|d| mask[d]);
        let suffix = extents.by_ref().find(|&reduced| reduced).is_some() && extents.all(|r| r);
        let summed = matches!(
            kind,
            ReduceKind::Sum
                | ReduceKind::Mean
                | ReduceKind::L1
                | ReduceKind::L2
                | ReduceKind::LogSum
                | ReduceKind::SumSquare
        );
        if suffix && summed && count > 0 && x.len() == y.len().saturating_mul(count) {
            return ctx.parallel_chunks(y, grain, |start, chunk| {
                let runs = x[start * count..].chunks_exact(count);
                for (yv, run) in chunk.iter_mut().zip(runs) {
                    *yv = T::narrow(finish::<T>(kind, sum_run::<T>(run, kind), count));
                }
            });
        }
        ctx.parallel_chunks(y, grain, |start, chunk| {
            let mut i = 0;
            walk_offsets(&kept, &strides, start, chunk.len(), |base| {
                let each = |f: &mut dyn FnMut(T::Wide)| {
                    walk_offsets(&red, &strides, 0, count, |o| f(x[base + o].widen()))
                };
                let mut acc = match kind {
                    ReduceKind::Max => lowest::<T>(),
                    ReduceKind::Min => highest::<T>(),
                    ReduceKind::Prod => <T::Wide as Arith>::ONE,
                    _ => <T::Wide as Arith>::ZERO,
                };
                // Sums of more than one run go through `Pairwise` (exact for integers,
                // accurate for floats); shorter ones are a plain run either way, without the
                // counter's setup per output element.
                let sum = |f: fn(T::Wide) -> T::Wide| {
                    if count <= Pairwise::<T::Wide>::BLOCK {
                        let mut s = <T::Wide as Arith>::ZERO;
                        each(&mut |v| s = s.add(f(v)));
                        return s;
                    }
                    let mut p = Pairwise::<T::Wide>::new();
                    each(&mut |v| p.add(f(v)));
                    p.sum()
                };
                match kind {
                    ReduceKind::Sum | ReduceKind::Mean | ReduceKind::LogSum => acc = sum(|v| v),
                    ReduceKind::Max => each(&mut |v| {
                        if v > acc {
                            acc = v
                        }
                    }),
                    ReduceKind::Min => each(&mut |v| {
                        if v < acc {
                            acc = v
                        }
                    }),
                    ReduceKind::Prod => each(&mut |v| acc = acc.mul(v)),
                    ReduceKind::L1 => acc = sum(|v| v.abs()),
                    ReduceKind::L2 | ReduceKind::SumSquare => acc = sum(|v| v.mul(v)),
                    ReduceKind::LogSumExp => {
                        let mut max = lowest::<T>();
                        each(&mut |v| {
                            if v > max {
                                max = v
                            }
                        });
                        let m = max.to_f64();
                        let m = if m.is_finite() { m } else { 0.0 };
                        let mut exps = Pairwise::<f64>::new();
                        each(&mut |v| exps.add((v.to_f64() - m).exp()));
                        acc = <T::Wide as Scalar>::from_f64(m + exps.sum().ln());
                    }
                }
                chunk[i] = T::narrow(finish::<T>(kind, acc, count));
                i += 1;
            });
        })
    }
}

/// The reduction's last step on its accumulated value (`count` values reduced).
#[inline(always)]
fn finish<T: Scalar>(kind: ReduceKind, acc: T::Wide, count: usize) -> T::Wide {
    match kind {
        ReduceKind::Mean => <T::Wide as Scalar>::from_f64(acc.to_f64() / count as f64),
        ReduceKind::L2 => <T::Wide as Scalar>::from_f64(acc.to_f64().sqrt()),
        ReduceKind::LogSum => <T::Wide as Scalar>::from_f64(acc.to_f64().ln()),
        _ => acc,
    }
}

simd_fn! {
    /// The summing reductions' accumulated value over one contiguous run (`kind`: Sum, Mean,
    /// LogSum: the values; L1: their magnitudes; L2, SumSquare: their squares).
    fn sum_run<T: Scalar>(run: &[T], kind: ReduceKind) -> T::Wide {
        match kind {
            ReduceKind::L1 => lanes_sum(run, |v: T::Wide| v.abs()),
            ReduceKind::L2 | ReduceKind::SumSquare => lanes_sum(run, |v: T::Wide| v.mul(v)),
            _ => lanes_sum(run, |v: T::Wide| v),
        }
    }
}

/// `Pairwise` summation of `f(v)` over `run` whose runs of `BLOCK` values are each summed in
/// 16 lanes and the lanes in a tree: the loop over a run vectorizes (a single running sum
/// does not: float addition does not reassociate), and the error still grows with log(n).
/// Integers sum exactly either way.
#[inline(always)]
fn lanes_sum<T: Scalar>(run: &[T], f: impl Fn(T::Wide) -> T::Wide) -> T::Wide {
    const LANES: usize = 16;
    let mut pairwise = Pairwise::<T::Wide>::new();
    let mut blocks = run.chunks_exact(Pairwise::<T::Wide>::BLOCK);
    for block in &mut blocks {
        let mut lanes = [<T::Wide as Arith>::ZERO; LANES];
        for part in block.chunks_exact(LANES) {
            for (l, &v) in lanes.iter_mut().zip(part) {
                *l = l.add(f(v.widen()));
            }
        }
        let mut width = LANES;
        while width > 1 {
            width /= 2;
            for i in 0..width {
                lanes[i] = lanes[i].add(lanes[i + width]);
            }
        }
        pairwise.add_run(lanes[0]);
    }
    for &v in blocks.remainder() {
        pairwise.add(f(v.widen()));
    }
    pairwise.sum()
}

impl Kernel for Reduce {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input(self.op, inputs, 0, "X")?.dtype;
        opreg_sdk::dispatch!(dtype, [F32, F64, F16, BF16, I32, I64, U64, Bool], |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for(self.op, other)))
    }
}

fn is_integer(d: DType) -> bool {
    matches!(d, DType::I32 | DType::I64)
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct ArgReduce {
    op: &'static str,
    max: bool,
    axis: i64,
    keepdims: bool,
    last: bool,
}

fn arg_factory(
    node: &NodeInfo<'_>,
    op: &'static str,
    max: bool,
) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(ArgReduce {
        op,
        max,
        axis: node.int_or("axis", 0)?,
        keepdims: node.int_or("keepdims", 1)? != 0,
        last: node.int_or("select_last_index", 0)? != 0,
    }))
}

impl ArgReduce {
    fn run<T: Scalar>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input(self.op, inputs, 0, "X")?;
        let xs = xv.shape();
        let x = xv.as_slice::<T>()?;
        let axis = normalize_axis(self.axis, xs.len()).map_err(|e| axis_err(self.op, e))?;
        let (_, n, inner) = split_at_axis(xs, axis);
        if n == 0 {
            return Err(PluginError::invalid(format!(
                "{}: axis {axis} of {xs:?} is empty",
                self.op
            )));
        }
        let mut out_shape = xs.to_vec();
        if self.keepdims {
            out_shape[axis] = 1;
        } else {
            out_shape.remove(axis);
        }
        let y = ctx.output_slice::<i64>(0, &out_shape)?;
        let (max, last) = (self.max, self.last);
        ctx.parallel_chunks(y, (16 * 1024 / n).max(1), |start, chunk| {
            for (k, yv) in chunk.iter_mut().enumerate() {
                let (o, i) = ((start + k) / inner, (start + k) % inner);
                let base = o * n * inner + i;
                let mut best = x[base].widen();
                let mut at = 0;
                for j in 1..n {
                    let v = x[base + j * inner].widen();
                    let better = match (max, last) {
                        (true, false) => v > best,
                        (true, true) => v >= best,
                        (false, false) => v < best,
                        (false, true) => v <= best,
                    };
                    if better {
                        best = v;
                        at = j;
                    }
                }
                *yv = at as i64;
            }
        })
    }
}

impl Kernel for ArgReduce {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input(self.op, inputs, 0, "X")?.dtype;
        opreg_sdk::dispatch!(dtype, [F32, F64, F16, BF16, I32, I64, U64, Bool], |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for(self.op, other)))
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct CumSum {
    exclusive: bool,
    reverse: bool,
}

fn cumsum_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(CumSum {
        exclusive: node.int_or("exclusive", 0)? != 0,
        reverse: node.int_or("reverse", 0)? != 0,
    }))
}

impl CumSum {
    fn run<T: Scalar>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input("CumSum", inputs, 0, "X")?;
        let xs = xv.shape();
        let x = xv.as_slice::<T>()?;
        let axis = match optional(inputs, 1).map(|t| t.to_i64s()) {
            Some(Ok(a)) if a.len() == 1 => a[0],
            _ => {
                return Err(PluginError::invalid(
                    "CumSum: input 'axis' must be an integer scalar",
                ))
            }
        };
        let axis = normalize_axis(axis, xs.len()).map_err(|e| axis_err("CumSum", e))?;
        let (_, n, inner) = split_at_axis(xs, axis);
        let y = ctx.output_slice::<T>(0, xs)?;
        // Saturating: it only overflows when Y is empty.
        let block = n.saturating_mul(inner);
        if block == 0 || y.is_empty() {
            return Ok(());
        }
        let (exclusive, reverse) = (self.exclusive, self.reverse);
        ctx.parallel_chunks(y, (16 * 1024 / block).max(1) * block, |start, chunk| {
            for (bi, yb) in chunk.chunks_mut(block).enumerate() {
                let xb = &x[start + bi * block..start + (bi + 1) * block];
                for i in 0..inner {
                    let mut acc = <T::Wide as Arith>::ZERO;
                    for step in 0..n {
                        let j = if reverse { n - 1 - step } else { step };
                        let v = xb[j * inner + i].widen();
                        if exclusive {
                            yb[j * inner + i] = T::narrow(acc);
                            acc = acc.add(v);
                        } else {
                            acc = acc.add(v);
                            yb[j * inner + i] = T::narrow(acc);
                        }
                    }
                }
            }
        })
    }
}

impl Kernel for CumSum {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input("CumSum", inputs, 0, "X")?.dtype;
        opreg_sdk::dispatch!(dtype, [F32, F64, F16, BF16, I32, I64, U64, Bool], |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for("CumSum", other)))
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct TopK {
    axis: i64,
    largest: bool,
    /// TopK-1 takes k as an attribute.
    attr_k: Option<i64>,
}

fn topk_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let attr_k = if node.opset < 10 {
        Some(node.int_or("k", -1)?)
    } else {
        None
    };
    Ok(Box::new(TopK {
        axis: node.int_or("axis", -1)?,
        largest: node.int_or("largest", 1)? != 0,
        attr_k,
    }))
}

impl TopK {
    fn run<T: Scalar>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input("TopK", inputs, 0, "X")?;
        let xs = xv.shape();
        let x = xv.as_slice::<T>()?;
        let k = match self.attr_k {
            Some(k) => k,
            None => match optional(inputs, 1).map(|t| t.to_i64s()) {
                Some(Ok(k)) if k.len() == 1 => k[0],
                _ => {
                    return Err(PluginError::invalid(
                        "TopK: input 'K' must be a 1-D tensor holding one integer",
                    ))
                }
            },
        };
        let axis = normalize_axis(self.axis, xs.len()).map_err(|e| axis_err("TopK", e))?;
        let (outer, n, inner) = split_at_axis(xs, axis);
        if k < 0 || k as usize > n {
            return Err(PluginError::invalid(format!(
                "TopK: K = {k} is outside [0, {n}] for axis {axis} of {xs:?}"
            )));
        }
        let k = k as usize;
        let mut out_shape = xs.to_vec();
        out_shape[axis] = k;
        let values = ctx.output_slice::<T>(0, &out_shape)?;
        let indices = ctx.output_slice::<i64>(1, &out_shape)?;
        if k == 0 || outer * inner == 0 {
            return Ok(());
        }
        let largest = self.largest;
        // Largest first (or smallest first); equal values by lower index; NaN counts as the
        // largest value.
        let order = |a: &(T::Wide, usize), b: &(T::Wide, usize)| {
            use std::cmp::Ordering;
            let c = match a.0.partial_cmp(&b.0) {
                Some(c) => c,
                None => {
                    #[allow(clippy::eq_op)]
                    let (an, bn) = (a.0 != a.0, b.0 != b.0);
                    an.cmp(&bn)
                }
            };
            let c = if largest { c.reverse() } else { c };
            if c == Ordering::Equal {
                a.1.cmp(&b.1)
            } else {
                c
            }
        };
        let vals = crate::nn::Disjoint::new(values);
        let idxs = crate::nn::Disjoint::new(indices);
        ctx.parallel_for(outer * inner, (4096 / n).max(1), |range| {
            let mut lane: Vec<(T::Wide, usize)> = try_with_capacity(n)?;
            for l in range {
                let (o, i) = (l / inner, l % inner);
                lane.clear();
                lane.extend((0..n).map(|j| (x[(o * n + j) * inner + i].widen(), j)));
                if k < n {
                    lane.select_nth_unstable_by(k - 1, order);
                    lane.truncate(k);
                }
                lane.sort_unstable_by(order);
                for (j, &(v, at)) in lane.iter().enumerate() {
                    let pos = (o * k + j) * inner + i;
                    // SAFETY: each lane writes its own positions only.
                    unsafe {
                        vals.part(pos, 1)[0] = T::narrow(v);
                        idxs.part(pos, 1)[0] = at as i64;
                    }
                }
            }
            Ok(())
        })
    }
}

impl Kernel for TopK {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input("TopK", inputs, 0, "X")?.dtype;
        opreg_sdk::dispatch!(dtype, [F32, F64, F16, BF16, I32, I64, U64, Bool], |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for("TopK", other)))
    }
}

// ---------------------------------------------------------------------------------------------

macro_rules! reduce_factories {
    ($($f:ident => $op:literal, $kind:ident;)*) => {$(
        fn $f(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
            reduce_factory(node, $op, ReduceKind::$kind)
        }
    )*};
}
reduce_factories! {
    reduce_sum => "ReduceSum", Sum;
    reduce_mean => "ReduceMean", Mean;
    reduce_max => "ReduceMax", Max;
    reduce_min => "ReduceMin", Min;
    reduce_prod => "ReduceProd", Prod;
    reduce_l1 => "ReduceL1", L1;
    reduce_l2 => "ReduceL2", L2;
    reduce_log_sum => "ReduceLogSum", LogSum;
    reduce_log_sum_exp => "ReduceLogSumExp", LogSumExp;
    reduce_sum_square => "ReduceSumSquare", SumSquare;
}

fn argmax_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    arg_factory(node, "ArgMax", true)
}
fn argmin_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    arg_factory(node, "ArgMin", false)
}

pub fn register(r: &mut Registrar) {
    let ti: &[(&str, &[DType])] = &[("T", NUMS), ("I", &[DType::I64])];
    let reductions: [(&str, &[i32], Factory); 10] = [
        ("ReduceSum", &[1, 11, 13], reduce_sum),
        ("ReduceMean", &[1, 11, 13, 18], reduce_mean),
        ("ReduceMax", &[1, 11, 12, 13, 18, 20], reduce_max),
        ("ReduceMin", &[1, 11, 12, 13, 18, 20], reduce_min),
        ("ReduceProd", &[1, 11, 13, 18], reduce_prod),
        ("ReduceL1", &[1, 11, 13, 18], reduce_l1),
        ("ReduceL2", &[1, 11, 13, 18], reduce_l2),
        ("ReduceLogSum", &[1, 11, 13, 18], reduce_log_sum),
        ("ReduceLogSumExp", &[1, 11, 13, 18], reduce_log_sum_exp),
        ("ReduceSumSquare", &[1, 11, 13, 18], reduce_sum_square),
    ];
    for (op, versions, factory) in reductions {
        // `axes` is the optional second input from opset 18 (13 for ReduceSum).
        if let Some((&20, older)) = versions.split_last() {
            // ReduceMax / ReduceMin take bool from opset 20.
            let ends = older.iter().skip(1).chain([&20]).map(|v| v - 1);
            for ((&since, end), types) in older
                .iter()
                .zip(ends)
                .map(|(s, e)| ((s, e), NUMS))
                .chain([((&20, OPEN_END), NUMS_AND_BOOL)])
            {
                r.kernel(
                    KernelDesc::onnx(op, since, end)
                        .constraint("T", types)
                        .constraint("I", &[DType::I64])
                        .inputs(&["T", "I"])
                        .outputs(&["T"]),
                    factory,
                );
            }
            continue;
        }
        register_versions(r, op, versions, ti, &["T", "I"], &["T"], factory);
    }
    register_versions(
        r,
        "ArgMax",
        &[1, 11, 12, 13],
        ti,
        &["T"],
        &["I"],
        argmax_factory,
    );
    register_versions(
        r,
        "ArgMin",
        &[1, 11, 12, 13],
        ti,
        &["T"],
        &["I"],
        argmin_factory,
    );
    register_versions(
        r,
        "CumSum",
        &[11, 14],
        &[("T", NUMS), ("T2", &[DType::I32, DType::I64])],
        &["T", "T2"],
        &["T"],
        cumsum_factory,
    );
    register_versions(
        r,
        "TopK",
        &[1, 10, 11],
        &[("T", NUMS_AND_U64), ("I", &[DType::I64])],
        &["T", "I"],
        &["T", "I"],
        topk_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, run_kernel_opt, NodeSpec},
    };

    fn data() -> (Vec<usize>, Vec<f32>) {
        let x: Vec<f32> = (0..24).map(|i| ((i * 5 % 7) as f32 - 2.5) / 2.0).collect();
        (vec![2, 3, 4], x)
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                x == y || (x - y).abs() <= 1e-5 * (1.0 + y.abs()) || (x.is_nan() && y.is_nan()),
                "at {i}: {x} vs {y}"
            );
        }
    }

    /// Naive reduction of [2, 3, 4] over the axes in `mask`, keepdims.
    fn naive(x: &[f32], mask: [bool; 3], f: impl Fn(&[f32]) -> f32) -> Vec<f32> {
        let dims = [2usize, 3, 4];
        let kept: Vec<usize> = (0..3).map(|d| if mask[d] { 1 } else { dims[d] }).collect();
        let mut out = Vec::new();
        for a in 0..kept[0] {
            for b in 0..kept[1] {
                for c in 0..kept[2] {
                    let mut vals = Vec::new();
                    for i in 0..2 {
                        for j in 0..3 {
                            for k in 0..4 {
                                if (mask[0] || i == a) && (mask[1] || j == b) && (mask[2] || k == c)
                                {
                                    vals.push(x[i * 12 + j * 4 + k]);
                                }
                            }
                        }
                    }
                    out.push(f(&vals));
                }
            }
        }
        out
    }

    type Case = (&'static str, Factory, fn(&[f32]) -> f32);

    fn cases() -> Vec<Case> {
        vec![
            ("ReduceSum", reduce_sum, |v| v.iter().sum()),
            ("ReduceMean", reduce_mean, |v| {
                v.iter().sum::<f32>() / v.len() as f32
            }),
            ("ReduceMax", reduce_max, |v| {
                v.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
            }),
            ("ReduceMin", reduce_min, |v| {
                v.iter().cloned().fold(f32::INFINITY, f32::min)
            }),
            ("ReduceProd", reduce_prod, |v| v.iter().product()),
            ("ReduceL1", reduce_l1, |v| v.iter().map(|a| a.abs()).sum()),
            ("ReduceL2", reduce_l2, |v| {
                v.iter().map(|a| a * a).sum::<f32>().sqrt()
            }),
            ("ReduceLogSum", reduce_log_sum, |v| {
                v.iter().sum::<f32>().ln()
            }),
            ("ReduceLogSumExp", reduce_log_sum_exp, |v| {
                v.iter().map(|a| a.exp()).sum::<f32>().ln()
            }),
            ("ReduceSumSquare", reduce_sum_square, |v| {
                v.iter().map(|a| a * a).sum()
            }),
        ]
    }

    #[test]
    fn every_reduction_with_axes_input_and_attribute() {
        let (shape, x) = data();
        let tx = HostTensor::from_vec(&shape, &x).expect("x");
        for (op, factory, f) in cases() {
            for (axes, mask) in [
                (vec![1i64], [false, true, false]),
                (vec![-1], [false, false, true]),
                (vec![0, 2], [true, false, true]),
                (vec![], [true, true, true]),
            ] {
                let want = naive(&x, mask, f);
                let kept: Vec<usize> = (0..3).map(|d| if mask[d] { 1 } else { shape[d] }).collect();
                let dropped: Vec<usize> = (0..3).filter(|&d| !mask[d]).map(|d| shape[d]).collect();
                // Axes as input (opset 18), keepdims 1 and 0.
                for keep in [1, 0] {
                    let ta = HostTensor::from_vec(&[axes.len()], &axes).expect("axes");
                    let out = run_kernel(
                        factory,
                        &NodeSpec::onnx(op, 18).attr("keepdims", AttrValue::Int(keep)),
                        &[&tx, &ta],
                        None,
                    )
                    .expect("run");
                    assert_eq!(
                        out[0].shape(),
                        if keep == 1 { &kept[..] } else { &dropped[..] },
                        "{op}"
                    );
                    close(&out[0].to_vec::<f32>().expect("y"), &want);
                }
                // Axes as attribute (opset 11); no attribute means every axis.
                let mut node = NodeSpec::onnx(op, 11);
                if !axes.is_empty() {
                    node = node.attr("axes", AttrValue::Ints(axes.clone()));
                }
                let out = run_kernel(factory, &node, &[&tx], None).expect("run");
                assert_eq!(out[0].shape(), &kept[..], "{op}");
                close(&out[0].to_vec::<f32>().expect("y"), &want);
            }
        }
    }

    #[test]
    fn reduce_sum_13_axes_input_and_noop() {
        let (shape, x) = data();
        let tx = HostTensor::from_vec(&shape, &x).expect("x");
        // No axes input at opset 13: every axis.
        let out = run_kernel_opt(
            reduce_sum,
            &NodeSpec::onnx("ReduceSum", 13),
            &[Some(&tx), None],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[1, 1, 1]);
        close(&out[0].to_vec::<f32>().expect("y"), &[x.iter().sum()]);
        // noop_with_empty_axes: the input back.
        let empty = HostTensor::from_vec::<i64>(&[0], &[]).expect("axes");
        let out = run_kernel(
            reduce_sum,
            &NodeSpec::onnx("ReduceSum", 13).attr("noop_with_empty_axes", AttrValue::Int(1)),
            &[&tx, &empty],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &shape[..]);
        close(&out[0].to_vec::<f32>().expect("y"), &x);
        // Out of range and duplicate axes are errors.
        for axes in [vec![3i64], vec![1, -2]] {
            let ta = HostTensor::from_vec(&[axes.len()], &axes).expect("axes");
            run_kernel(
                reduce_sum,
                &NodeSpec::onnx("ReduceSum", 13),
                &[&tx, &ta],
                None,
            )
            .expect_err("bad axes");
        }
    }

    /// A plain f32 running sum of ones stops at 2^24; ONNX Runtime gives 2^25.
    #[test]
    fn reduce_sum_of_2_pow_25_ones_is_exact() {
        let n = 1usize << 25;
        let tx = HostTensor::from_vec(&[n], &vec![1.0f32; n]).expect("x");
        for (op, factory, want) in [
            ("ReduceSum", reduce_sum as Factory, n as f32),
            ("ReduceSumSquare", reduce_sum_square, n as f32),
            ("ReduceL1", reduce_l1, n as f32),
            ("ReduceMean", reduce_mean, 1.0),
            ("ReduceL2", reduce_l2, (n as f64).sqrt() as f32),
        ] {
            let out = run_kernel(factory, &NodeSpec::onnx(op, 13), &[&tx], None).expect("run");
            assert_eq!(out[0].to_vec::<f32>().expect("y"), vec![want], "{op}");
        }
        // Along a strided axis too: [n / 4, 4] over axis 0.
        let tx = HostTensor::from_vec(&[n / 4, 4], &vec![1.0f32; n]).expect("x");
        let out = run_kernel(
            reduce_sum,
            &NodeSpec::onnx("ReduceSum", 11).attr("axes", AttrValue::Ints(vec![0])),
            &[&tx],
            None,
        )
        .expect("run");
        assert_eq!(out[0].to_vec::<f32>().expect("y"), vec![(n / 4) as f32; 4]);
    }

    /// Reductions over trailing extents (each output one contiguous run, summed in lanes) and
    /// over leading ones (the general walk) against f64 sums: runs shorter than a block, whole
    /// blocks, blocks and a tail, size-1 extents between, keepdims on and off.
    #[test]
    fn contiguous_and_strided_runs_match_f64_sums() {
        let cases: [(&[usize], &[i64]); 6] = [
            (&[3, 1, 5, 40], &[2, 3]),
            (&[3, 1, 5, 40], &[1, 3]),
            (&[2, 64], &[1]),
            (&[2, 3, 1000], &[2]),
            (&[1, 3, 37, 37], &[0, 1, 2, 3]),
            (&[130, 2, 1], &[0, 2]),
        ];
        for (shape, axes) in cases {
            let n: usize = shape.iter().product();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1009) as f32 - 500.0) / 97.0)
                .collect();
            let tx = HostTensor::from_vec(shape, &x).expect("x");
            let reduced: Vec<bool> = (0..shape.len())
                .map(|d| axes.contains(&(d as i64)))
                .collect();
            // The reference: each output's inputs gathered by its index, summed in f64.
            let strides = row_major_strides(shape);
            let kept: Vec<usize> = (0..shape.len())
                .map(|d| if reduced[d] { 1 } else { shape[d] })
                .collect();
            let outs: usize = kept.iter().product();
            let mut groups = vec![Vec::new(); outs];
            for (i, &v) in x.iter().enumerate() {
                let mut o = 0;
                for d in 0..shape.len() {
                    o = o * kept[d]
                        + if reduced[d] {
                            0
                        } else {
                            i / strides[d] % shape[d]
                        };
                }
                groups[o].push(v as f64);
            }
            type Reference = fn(&[f64]) -> f64;
            let ops: [(&str, Factory, Reference); 5] = [
                ("ReduceSum", reduce_sum, |v| v.iter().sum()),
                ("ReduceMean", reduce_mean, |v| {
                    v.iter().sum::<f64>() / v.len() as f64
                }),
                ("ReduceL1", reduce_l1, |v| v.iter().map(|a| a.abs()).sum()),
                ("ReduceL2", reduce_l2, |v| {
                    v.iter().map(|a| a * a).sum::<f64>().sqrt()
                }),
                ("ReduceSumSquare", reduce_sum_square, |v| {
                    v.iter().map(|a| a * a).sum()
                }),
            ];
            for (op, factory, reference) in ops {
                for keepdims in [0, 1] {
                    // Opset 11: every reduction takes `axes` as an attribute.
                    let node = NodeSpec::onnx(op, 11)
                        .attr("axes", AttrValue::Ints(axes.to_vec()))
                        .attr("keepdims", AttrValue::Int(keepdims));
                    let out = run_kernel(factory, &node, &[&tx], None).expect("run");
                    let want: Vec<usize> = if keepdims == 1 {
                        kept.clone()
                    } else {
                        (0..shape.len())
                            .filter(|&d| !reduced[d])
                            .map(|d| shape[d])
                            .collect()
                    };
                    assert_eq!(out[0].shape(), &want[..], "{op} {shape:?} {axes:?}");
                    let got = out[0].to_vec::<f32>().expect("y");
                    for (g, group) in got.iter().zip(&groups) {
                        let r = reference(group);
                        assert!(
                            (*g as f64 - r).abs() <= 1e-5 * r.abs().max(1.0),
                            "{op} {shape:?} {axes:?}: {g} vs {r}"
                        );
                    }
                }
            }
        }
        // Integers sum exactly in lanes too.
        let big: Vec<i64> = (0..1000).map(|i| (i * i) as i64 - 300_000).collect();
        let tx = HostTensor::from_vec(&[2, 500], &big).expect("x");
        let node = NodeSpec::onnx("ReduceSum", 11).attr("axes", AttrValue::Ints(vec![1]));
        let out = run_kernel(reduce_sum, &node, &[&tx], None).expect("run");
        let want: Vec<i64> = big.chunks(500).map(|c| c.iter().sum()).collect();
        assert_eq!(out[0].to_vec::<i64>().expect("y"), want);
    }

    #[test]
    fn pairwise_matches_exact_sums() {
        for n in [0usize, 1, 63, 64, 65, 1000, 4097] {
            let mut p = Pairwise::<i64>::new();
            (1..=n as i64).for_each(|v| p.add(v));
            assert_eq!(p.sum(), (n * (n + 1) / 2) as i64, "{n}");
        }
    }

    #[test]
    fn integer_reductions() {
        let x: Vec<i64> = vec![3, -7, 5, 1 << 40, 2, 9];
        let tx = HostTensor::from_vec(&[2, 3], &x).expect("x");
        let axes = HostTensor::from_vec(&[1], &[1i64]).expect("axes");
        let out = run_kernel(
            reduce_sum,
            &NodeSpec::onnx("ReduceSum", 13),
            &[&tx, &axes],
            None,
        )
        .expect("run");
        assert_eq!(out[0].to_vec::<i64>().expect("y"), vec![1, (1 << 40) + 11]);
        let x32: Vec<i32> = vec![3, -7, 5, 4, 2, 9];
        let tx = HostTensor::from_vec(&[2, 3], &x32).expect("x");
        let out = run_kernel(
            reduce_max,
            &NodeSpec::onnx("ReduceMax", 18).attr("keepdims", AttrValue::Int(0)),
            &[&tx, &axes],
            None,
        )
        .expect("run");
        assert_eq!(out[0].to_vec::<i32>().expect("y"), vec![5, 9]);
        let out = run_kernel(
            reduce_mean,
            &NodeSpec::onnx("ReduceMean", 13).attr("axes", AttrValue::Ints(vec![0])),
            &[&tx],
            None,
        )
        .expect("run");
        assert_eq!(out[0].to_vec::<i32>().expect("y"), vec![3, -2, 7]);
    }

    #[test]
    fn argmax_argmin() {
        let x = [1.0f32, 5.0, 5.0, 0.0, -1.0, 0.0];
        let tx = HostTensor::from_vec(&[2, 3], &x).expect("x");
        let run = |f: Factory, axis: i64, keep: i64, last: i64| {
            let out = run_kernel(
                f,
                &NodeSpec::onnx("ArgMax", 13)
                    .attr("axis", AttrValue::Int(axis))
                    .attr("keepdims", AttrValue::Int(keep))
                    .attr("select_last_index", AttrValue::Int(last)),
                &[&tx],
                None,
            )
            .expect("run");
            (
                out[0].shape().to_vec(),
                out[0].to_vec::<i64>().expect("i64"),
            )
        };
        assert_eq!(run(argmax_factory, 1, 1, 0), (vec![2, 1], vec![1, 0]));
        assert_eq!(run(argmax_factory, -1, 0, 1), (vec![2], vec![2, 2]));
        assert_eq!(run(argmin_factory, 1, 0, 0), (vec![2], vec![0, 1]));
        assert_eq!(run(argmin_factory, 0, 1, 0), (vec![1, 3], vec![1, 1, 1]));
    }

    #[test]
    fn cumsum_modes() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let tx = HostTensor::from_vec(&[2, 3], &x).expect("x");
        let run = |axis: i64, exclusive: i64, reverse: i64| {
            let ta = HostTensor::from_vec(&[], &[axis]).expect("axis");
            let out = run_kernel(
                cumsum_factory,
                &NodeSpec::onnx("CumSum", 14)
                    .attr("exclusive", AttrValue::Int(exclusive))
                    .attr("reverse", AttrValue::Int(reverse)),
                &[&tx, &ta],
                None,
            )
            .expect("run");
            out[0].to_vec::<f32>().expect("f32")
        };
        assert_eq!(run(1, 0, 0), vec![1., 3., 6., 4., 9., 15.]);
        assert_eq!(run(-1, 1, 0), vec![0., 1., 3., 0., 4., 9.]);
        assert_eq!(run(1, 0, 1), vec![6., 5., 3., 15., 11., 6.]);
        assert_eq!(run(1, 1, 1), vec![5., 3., 0., 11., 6., 0.]);
        assert_eq!(run(0, 0, 0), vec![1., 2., 3., 5., 7., 9.]);
    }

    #[test]
    fn topk_largest_smallest_ties() {
        let x = [3.0f32, 1.0, 3.0, 2.0, 0.0, 4.0, 4.0, -1.0];
        let tx = HostTensor::from_vec(&[2, 4], &x).expect("x");
        let k = HostTensor::from_vec(&[1], &[2i64]).expect("k");
        let run = |axis: i64, largest: i64, k: &HostTensor| {
            let out = run_kernel(
                topk_factory,
                &NodeSpec::onnx("TopK", 11)
                    .attr("axis", AttrValue::Int(axis))
                    .attr("largest", AttrValue::Int(largest))
                    .outputs(2),
                &[&tx, k],
                None,
            )
            .expect("run");
            (
                out[0].shape().to_vec(),
                out[0].to_vec::<f32>().expect("v"),
                out[1].to_vec::<i64>().expect("i"),
            )
        };
        assert_eq!(
            run(-1, 1, &k),
            (vec![2, 2], vec![3., 3., 4., 4.], vec![0, 2, 1, 2])
        );
        assert_eq!(
            run(1, 0, &k),
            (vec![2, 2], vec![1., 2., -1., 0.], vec![1, 3, 3, 0])
        );
        let k1 = HostTensor::from_vec(&[1], &[1i64]).expect("k");
        assert_eq!(
            run(0, 1, &k1),
            (vec![1, 4], vec![3., 4., 4., 2.], vec![0, 1, 1, 0])
        );
        let k9 = HostTensor::from_vec(&[1], &[9i64]).expect("k");
        let err = run_kernel(
            topk_factory,
            &NodeSpec::onnx("TopK", 11).outputs(2),
            &[&tx, &k9],
            None,
        )
        .expect_err("k too large");
        assert!(err.message.contains("K = 9"), "{}", err.message);
    }
}

#[cfg(test)]
mod bool_u64_tests {
    use super::*;
    use crate::testcases::run_cases;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    #[test]
    fn reduce_max_min_on_bool() {
        // [[1,0],[0,0],[1,1]] over axis 1: max (any) [1,0,1], min (all) [0,0,1].
        let x = HostTensor::from_bytes(DType::Bool, &[3, 2], &[1, 0, 0, 0, 1, 1]).expect("x");
        let axes = HostTensor::from_vec(&[1], &[1i64]).expect("axes");
        let node = |op| NodeSpec::onnx(op, 20).attr("keepdims", AttrValue::Int(0));
        let y = run_kernel(reduce_max, &node("ReduceMax"), &[&x, &axes], None).expect("max");
        assert_eq!(
            (y[0].dtype(), y[0].bytes()),
            (DType::Bool, &[1u8, 0, 1][..])
        );
        let y = run_kernel(reduce_min, &node("ReduceMin"), &[&x, &axes], None).expect("min");
        assert_eq!(y[0].bytes(), &[0u8, 0, 1]);
    }

    #[test]
    fn official_cases() {
        run_cases(
            &["test_reduce_max_bool", "test_reduce_max_empty_set_bool"],
            reduce_max,
        );
        run_cases(&["test_reduce_min_bool"], reduce_min);
        run_cases(&["test_top_k"], topk_factory);
    }
}
