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
        if let Some(block) = middle_block(xs, &mask) {
            if kind != ReduceKind::LogSumExp
                && count > 0
                && block
                    .0
                    .checked_mul(block.1)
                    .and_then(|n| n.checked_mul(block.2))
                    == Some(x.len())
                && y.len() == block.0.saturating_mul(block.2)
            {
                return reduce_middle::<T>(ctx, x, y, block, kind);
            }
        }
        if suffix
            && matches!(kind, ReduceKind::Max | ReduceKind::Min)
            && count > 0
            && x.len() == y.len().saturating_mul(count)
        {
            return extremes_of_runs::<T>(ctx, x, y, count, kind == ReduceKind::Max, grain);
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

/// X as `[outer, r, inner]` where the reduced extents (size-1 ones aside) are consecutive and
/// kept ones follow them (a reduction over the channels of NCHW, over the rows of a matrix):
/// `None` for any other pattern (none reduced, a suffix, reduced extents apart).
fn middle_block(xs: &[usize], mask: &[bool]) -> Option<(usize, usize, usize)> {
    let dims: Vec<(usize, bool)> = xs
        .iter()
        .zip(mask)
        .filter(|(&n, _)| n != 1)
        .map(|(&n, &m)| (n, m))
        .collect();
    let first = dims.iter().position(|d| d.1)?;
    let last = dims.iter().rposition(|d| d.1)?;
    if last + 1 == dims.len() || !dims[first..=last].iter().all(|d| d.1) {
        return None;
    }
    let product =
        |d: &[(usize, bool)]| d.iter().try_fold(1usize, |acc, &(n, _)| acc.checked_mul(n));
    Some((
        product(&dims[..first])?,
        product(&dims[first..=last])?,
        product(&dims[last + 1..])?,
    ))
}

/// Output elements per task piece of [`reduce_middle`] at most: its accumulators (and merge
/// levels) stay in L1 and L2 while X's rows stream through them. Pieces of 256 took 2.5x
/// ONNX Runtime's time over 64 channels of 55x55 planes: each piece read 64 runs of 1 KiB
/// at once, more streams than the hardware prefetches.
const MAX_PIECE: usize = 4096;

/// A reduction of X as `[outer, r, inner]` over `r` (see [`middle_block`]) into `y`
/// (`[outer, inner]`): each piece of outputs accumulates X's `r` rows elementwise, a loop
/// across the row that vectorizes, where the general walk took two closure calls per element
/// on one thread (a ReduceSum over the 64 channels of an 8x64x55x55 tensor: 4.4 ms against
/// ONNX Runtime's 0.045). Every output sees its values in the general walk's order, with its
/// rounding: a plain sum up to [`Pairwise::BLOCK`] values, else `Pairwise`'s runs and
/// merges, each level held as a row of the piece's width (all outputs of a piece close their
/// runs together).
fn reduce_middle<T: Scalar>(
    ctx: &KernelContext<'_>,
    x: &[T],
    y: &mut [T],
    (outer, r, inner): (usize, usize, usize),
    kind: ReduceKind,
) -> Result<(), PluginError> {
    // Pieces as wide as the rows allow, yet enough of them for every thread.
    let per_outer_wanted = (4 * ctx.num_threads().max(1)).div_ceil(outer.max(1));
    let piece = inner
        .div_ceil(per_outer_wanted)
        .next_multiple_of(16)
        .clamp(16, MAX_PIECE);
    let per_outer = inner.div_ceil(piece);
    let pieces = outer.saturating_mul(per_outer);
    let block = Pairwise::<T::Wide>::BLOCK;
    // Merge levels a sum of `r` values reaches: one per bit of its count of whole runs.
    let levels = (usize::BITS - (r / block).leading_zeros()) as usize;
    let merged_len = if r > block { levels * piece } else { 0 };
    let yd = crate::nn::Disjoint::new(y);
    let grain = (256 * 1024 / r.saturating_mul(piece).max(1)).max(1);
    ctx.parallel_for(pieces, grain, |range| {
        let zero = <T::Wide as Arith>::ZERO;
        let mut acc = opreg_sdk::alloc::try_vec(piece, zero)?;
        let mut merged = opreg_sdk::alloc::try_vec(merged_len, zero)?;
        for p in range {
            let (o, i0) = (p / per_outer, p % per_outer * piece);
            let w = piece.min(inner - i0);
            let base = o * r * inner + i0;
            let rows = (0..r).map(|k| &x[base + k * inner..][..w]);
            let acc = &mut acc[..w];
            match kind {
                ReduceKind::Max | ReduceKind::Min => {
                    let max = kind == ReduceKind::Max;
                    acc.fill(if max { lowest::<T>() } else { highest::<T>() });
                    for row in rows {
                        extreme_rows::<T>(acc, row, max);
                    }
                }
                ReduceKind::Prod => {
                    acc.fill(<T::Wide as Arith>::ONE);
                    for row in rows {
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a = a.mul(v.widen());
                        }
                    }
                }
                _ => {
                    acc.fill(zero);
                    sum_rows::<T>(acc, rows, r, kind, (&mut merged, piece));
                }
            }
            // SAFETY: piece `p` alone writes outputs `o * inner + i0..+w` (inside y: `y` is
            // `outer x inner`, checked by the caller).
            let out = unsafe { yd.part(o * inner + i0, w) };
            for (yv, &a) in out.iter_mut().zip(acc.iter()) {
                *yv = T::narrow(finish::<T>(kind, a, r));
            }
        }
        Ok(())
    })
}

simd_fn! {
    /// Folds one row into the running maxima (`max`) or minima, as the general walk does per
    /// value (a NaN never replaces, ties keep the earlier).
    fn extreme_rows<T: Scalar>(acc: &mut [T::Wide], row: &[T], max: bool) {
        for (a, &v) in acc.iter_mut().zip(row) {
            let v = v.widen();
            if beats(max, v, *a) {
                *a = v;
            }
        }
    }
}

/// The summing reductions' sums of `r` rows into `acc` (zeros), elementwise in the general
/// walk's order: plain up to [`Pairwise::BLOCK`] rows, else in runs of that many merged like
/// `Pairwise` into `merged` (a row of `piece` per level).
fn sum_rows<'a, T: Scalar + 'a>(
    acc: &mut [T::Wide],
    rows: impl Iterator<Item = &'a [T]>,
    r: usize,
    kind: ReduceKind,
    (merged, piece): (&mut [T::Wide], usize),
) {
    let block = Pairwise::<T::Wide>::BLOCK;
    let w = acc.len();
    let add_row = |acc: &mut [T::Wide], row: &[T]| match kind {
        ReduceKind::L1 => add_mapped::<T>(acc, row, 1),
        ReduceKind::L2 | ReduceKind::SumSquare => add_mapped::<T>(acc, row, 2),
        _ => add_mapped::<T>(acc, row, 0),
    };
    if r <= block {
        rows.for_each(|row| add_row(acc, row));
        return;
    }
    // `acc` is the open run; bit `l` of `occupied` says whether level `l` holds a sum.
    let mut occupied = 0u64;
    let mut in_run = 0;
    for row in rows {
        add_row(acc, row);
        in_run += 1;
        if in_run < block {
            continue;
        }
        in_run = 0;
        // The closed run carried up through the occupied levels, as `Pairwise::add_run`.
        for (l, level) in merged.chunks_exact_mut(piece).enumerate() {
            let level = &mut level[..w];
            if occupied & (1 << l) != 0 {
                for (c, s) in acc.iter_mut().zip(level.iter()) {
                    *c = s.add(*c);
                }
                occupied &= !(1 << l);
            } else {
                level.copy_from_slice(acc);
                occupied |= 1 << l;
                break;
            }
        }
        acc.fill(<T::Wide as Arith>::ZERO);
    }
    // `Pairwise::sum`: the open run, then the levels from the smallest up.
    for (l, level) in merged.chunks_exact(piece).enumerate() {
        if occupied & (1 << l) != 0 {
            for (a, s) in acc.iter_mut().zip(&level[..w]) {
                *a = a.add(*s);
            }
        }
    }
}

simd_fn! {
    /// `acc += f(row)` elementwise, `f` the identity (`how` 0), the magnitude (1) or the
    /// square (2).
    fn add_mapped<T: Scalar>(acc: &mut [T::Wide], row: &[T], how: u8) {
        match how {
            1 => acc.iter_mut().zip(row).for_each(|(a, &v)| *a = a.add(v.widen().abs())),
            2 => acc.iter_mut().zip(row).for_each(|(a, &v)| {
                let v = v.widen();
                *a = a.add(v.mul(v))
            }),
            _ => acc.iter_mut().zip(row).for_each(|(a, &v)| *a = a.add(v.widen())),
        }
    }
}

/// Runs at least this long are split over the threads when there are fewer outputs than
/// threads (a whole tensor's maximum).
const SPLIT_RUN: usize = 1 << 16;

/// ReduceMax (`max`) or ReduceMin where each output is one contiguous run of `count` values
/// of `x`: each run in lanes that vectorize, and a few long runs split over the threads (the
/// maximum and minimum are the same in any order). The general walk took 2.4 ms over 1.5 M
/// floats against ONNX Runtime's 0.09 (a call through two closures per element, on one
/// thread).
fn extremes_of_runs<T: Scalar>(
    ctx: &KernelContext<'_>,
    x: &[T],
    y: &mut [T],
    count: usize,
    max: bool,
    grain: usize,
) -> Result<(), PluginError> {
    let init = if max { lowest::<T>() } else { highest::<T>() };
    let threads = ctx.num_threads().max(1);
    if y.len() >= threads || count < SPLIT_RUN {
        return ctx.parallel_chunks(y, grain, |start, chunk| {
            for (yv, run) in chunk.iter_mut().zip(x[start * count..].chunks_exact(count)) {
                *yv = T::narrow(extreme_run::<T>(run, max, init));
            }
        });
    }
    let parts = 4 * threads;
    let part_len = count.div_ceil(parts);
    let mut partial = opreg_sdk::alloc::try_vec(parts, init)?;
    for (yv, run) in y.iter_mut().zip(x.chunks_exact(count)) {
        ctx.parallel_chunks(&mut partial, 1, |p, out| {
            let from = (p * part_len).min(count);
            let to = from.saturating_add(part_len).min(count);
            out[0] = extreme_run::<T>(&run[from..to], max, init);
        })?;
        let mut acc = init;
        for &v in &partial {
            if beats(max, v, acc) {
                acc = v;
            }
        }
        *yv = T::narrow(acc);
    }
    Ok(())
}

simd_fn! {
    /// The maximum (`max`) or minimum of `init` and `run`'s values, NaN values skipped as the
    /// general walk skips them (a comparison with NaN is false), in 16 lanes that vectorize.
    fn extreme_run<T: Scalar>(run: &[T], max: bool, init: T::Wide) -> T::Wide {
        // Each branch a loop of its own comparison (`max` a constant inside each).
        if max {
            lanes_extreme(run, init, true)
        } else {
            lanes_extreme(run, init, false)
        }
    }
}

/// Whether `v` replaces `acc` as the running maximum (`max`) or minimum: strictly beyond it
/// (a NaN on either side never does; ties keep the earlier).
#[inline(always)]
fn beats<W: PartialOrd>(max: bool, v: W, acc: W) -> bool {
    if max {
        v > acc
    } else {
        v < acc
    }
}

#[inline(always)]
fn lanes_extreme<T: Scalar>(run: &[T], init: T::Wide, max: bool) -> T::Wide {
    const LANES: usize = 16;
    let mut lanes = [init; LANES];
    let mut parts = run.chunks_exact(LANES);
    for part in &mut parts {
        for (l, &v) in lanes.iter_mut().zip(part) {
            let v = v.widen();
            if beats(max, v, *l) {
                *l = v;
            }
        }
    }
    let rest = parts.remainder().iter().map(|v| v.widen());
    let mut acc = init;
    for v in lanes.into_iter().chain(rest) {
        if beats(max, v, acc) {
            acc = v;
        }
    }
    acc
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
        let (max, last) = (self.max, self.last);
        if let (Some(x), true) = (x_f32::<T>(x), inner > 1 && u32::try_from(n).is_ok()) {
            // Every output element is written.
            let y = ctx.output_slice_to_overwrite::<i64>(0, &out_shape)?;
            return ctx.parallel_chunks(y, (16 * 1024 / n).max(1), |start, chunk| {
                arg_rows_f32(x, (n, inner), (max, last), start, chunk)
            });
        }
        let y = ctx.output_slice::<i64>(0, &out_shape)?;
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

/// `x` as f32, when `T` is f32.
fn x_f32<T: Scalar>(x: &[T]) -> Option<&[f32]> {
    (T::DTYPE == DType::F32).then(|| {
        // SAFETY: `T` is f32 (its dtype), so the slice's memory is f32s.
        unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) }
    })
}

/// Positions of ArgMax/ArgMin per block of outputs along the inner axes.
const ARG_BLOCK: usize = 64;

crate::simd::simd_fn! {
    /// ArgMax (`max`) or ArgMin over the middle axis of `x` (`[outer, n, inner]`, f32) for
    /// the outputs `start..start + y.len()`: per block of up to [`ARG_BLOCK`] outputs along
    /// the inner axes, the running best values and their indices, updated row after row of
    /// the reduced axis with compares and selects that vectorize. The general loop walked
    /// each output's `n` values `inner` apart with a branch per value (ArgMax over the
    /// channels of 8x64x56x56: 2.8x ONNX Runtime's time). The same comparisons in the same
    /// order per output, so the same index (NaN: a NaN first value is never replaced, a later
    /// one never wins; `last`: ties go to the later index).
    fn arg_rows_f32(
        x: &[f32],
        shape: (usize, usize),
        mode: (bool, bool),
        start: usize,
        y: &mut [i64],
    ) {
        let ((n, inner), (max, last)) = (shape, mode);
        let mut done = 0;
        while done < y.len() {
            let at = start + done;
            let (o, i) = (at / inner, at % inner);
            // A block inside one outer slice.
            let len = (y.len() - done).min(inner - i).min(ARG_BLOCK);
            let base = o * n * inner + i;
            let mut best = [0.0f32; ARG_BLOCK];
            let mut index = [0u32; ARG_BLOCK];
            best[..len].copy_from_slice(&x[base..base + len]);
            for j in 1..n {
                let row = &x[base + j * inner..][..len];
                let j = j as u32;
                for ((b, a), &v) in best[..len].iter_mut().zip(&mut index[..len]).zip(row) {
                    let better = match (max, last) {
                        (true, false) => v > *b,
                        (true, true) => v >= *b,
                        (false, false) => v < *b,
                        (false, true) => v <= *b,
                    };
                    *b = if better { v } else { *b };
                    *a = if better { j } else { *a };
                }
            }
            for (out, &a) in y[done..done + len].iter_mut().zip(&index[..len]) {
                *out = i64::from(a);
            }
            done += len;
        }
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

/// TopK's `k` up to which one pass keeps the best in order (see `TopK::run`).
const SCAN_K: usize = 64;

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
            let scan = k <= SCAN_K && k.saturating_mul(8) <= n;
            let mut lane: Vec<(T::Wide, usize)> = try_with_capacity(if scan { k + 1 } else { n })?;
            for l in range {
                let (o, i) = (l / inner, l % inner);
                lane.clear();
                let at = |j: usize| x[(o * n + j) * inner + i].widen();
                if scan {
                    // A few of many (a classifier's top 5 of 1000-30000 scores): one pass
                    // keeping the best k in order; a value past the k-th's is turned away by
                    // one comparison (a NaN, the largest of all, is not, nor a tie, which
                    // the order decides by index). Selecting over the whole lane took 40x
                    // ONNX Runtime's time (64 rows of 30000).
                    let mut j = 0;
                    while j < n {
                        // A contiguous lane (the last axis) is turned away 16 values at a
                        // time while none of them can enter (one vector compare).
                        if inner == 1 && lane.len() == k && j + 16 <= n {
                            let t = lane[k - 1].0;
                            let run = &x[o * n + j..][..16];
                            let any = run.iter().fold(false, |a, &v| {
                                let v = v.widen();
                                a | !beats(!largest, v, t)
                            });
                            if !any {
                                j += 16;
                                continue;
                            }
                        }
                        let (i_v, v) = (j, at(j));
                        j += 1;
                        if lane.len() == k {
                            let worst = lane[k - 1];
                            if beats(!largest, v, worst.0) {
                                continue;
                            }
                            if order(&(v, i_v), &worst) != std::cmp::Ordering::Less {
                                continue;
                            }
                            lane.pop();
                        }
                        let pos = lane
                            .partition_point(|e| order(e, &(v, i_v)) == std::cmp::Ordering::Less);
                        lane.insert(pos, (v, i_v));
                    }
                } else {
                    lane.extend((0..n).map(|j| (at(j), j)));
                    if k < n {
                        lane.select_nth_unstable_by(k - 1, order);
                        lane.truncate(k);
                    }
                    lane.sort_unstable_by(order);
                }
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

    /// ReduceMax and ReduceMin over trailing extents (one contiguous run per output, in
    /// lanes; a whole tensor of 2^17 + 5 values split over the threads) against a plain loop:
    /// NaN values skipped, the extreme in a run's tail or its first value, i64 and f32.
    #[test]
    fn max_and_min_over_contiguous_runs_match_a_plain_loop() {
        let n = (1 << 17) + 5;
        // (shape, axes, the length of each output's run)
        let cases: [(Vec<usize>, Vec<i64>, usize); 4] = [
            (vec![n], vec![0], n),
            (vec![1, n], vec![0, 1], n),
            (vec![3, 1, 37], vec![2], 37),
            (vec![2, 3, 1000], vec![1, 2], 3000),
        ];
        for (shape, axes, run) in cases {
            let len: usize = shape.iter().product();
            let mut x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 100_003) as f32 - 50_000.0) / 7.0)
                .collect();
            for i in (3..len).step_by(101) {
                x[i] = f32::NAN;
            }
            // The largest in the last run's last value, the smallest in its first.
            x[len - 1] = 1e9;
            x[len - run] = -1e9;
            let ix: Vec<i64> = x
                .iter()
                .map(|v| if v.is_nan() { 0 } else { *v as i64 })
                .collect();
            let fold = |vals: &[f32], max: bool| {
                let mut acc = if max {
                    f32::NEG_INFINITY
                } else {
                    f32::INFINITY
                };
                for &v in vals {
                    if (max && v > acc) || (!max && v < acc) {
                        acc = v;
                    }
                }
                acc
            };
            for (op, factory, max) in [
                ("ReduceMax", reduce_max as Factory, true),
                ("ReduceMin", reduce_min as Factory, false),
            ] {
                let node = NodeSpec::onnx(op, 13)
                    .attr("axes", AttrValue::Ints(axes.clone()))
                    .attr("keepdims", AttrValue::Int(0));
                let tx = HostTensor::from_vec(&shape, &x).expect("x");
                let got = run_kernel(factory, &node, &[&tx], None).expect("run")[0]
                    .to_vec::<f32>()
                    .expect("y");
                let want: Vec<f32> = x.chunks(run).map(|c| fold(c, max)).collect();
                assert_eq!(got, want, "{op} {shape:?}");
                let tx = HostTensor::from_vec(&shape, &ix).expect("x");
                let got = run_kernel(factory, &node, &[&tx], None).expect("run")[0]
                    .to_vec::<i64>()
                    .expect("y");
                let want: Vec<i64> = ix
                    .chunks(run)
                    .map(|c| if max { c.iter().max() } else { c.iter().min() })
                    .map(|v| *v.expect("a value"))
                    .collect();
                assert_eq!(got, want, "{op} i64 {shape:?}");
            }
        }
    }

    /// Reductions over consecutive axes with kept ones after them (X as `[outer, r, inner]`:
    /// rows accumulated elementwise, in pieces of 256 outputs) equal, bit for bit, each output
    /// reduced alone in the general walk's order: plain sums up to 64 values, `Pairwise`
    /// beyond (r = 64, 65, 130, 4100: runs, merges, an open run), maxima and minima with NaN
    /// and signed zeros, products; inner extents of one piece and of several, size-1
    /// extents between.
    #[test]
    fn reductions_over_middle_axes_match_each_output_reduced_alone() {
        /// Shape, axes, and X's `[outer, r, inner]` view.
        type Case<'a> = (&'a [usize], &'a [i64], usize, usize, usize);
        let cases: [Case; 6] = [
            (&[2, 64, 3], &[1], 2, 64, 3),
            (&[65, 300], &[0], 1, 65, 300),
            (&[3, 1, 130, 1, 5], &[1, 2], 3, 130, 5),
            (&[2, 5, 2, 7], &[1, 2], 2, 10, 7),
            (&[1, 4100, 2], &[1], 1, 4100, 2),
            (&[2, 3, 70, 260], &[1], 2, 3, 18_200),
        ];
        let plain_or_pairwise = |v: &[f32], f: fn(f32) -> f32| {
            if v.len() <= Pairwise::<f32>::BLOCK {
                v.iter().fold(0.0f32, |s, &a| s + f(a))
            } else {
                let mut p = Pairwise::<f32>::new();
                v.iter().for_each(|&a| p.add(f(a)));
                p.sum()
            }
        };
        type Reference = Box<dyn Fn(&[f32]) -> f32>;
        for (shape, axes, outer, r, inner) in cases {
            let n: usize = shape.iter().product();
            let mut x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1009) as f32 - 500.0) / 97.0)
                .collect();
            for i in (5..n).step_by(37) {
                x[i] = -0.0;
            }
            let mut with_nan = x.clone();
            for i in (2..n).step_by(29) {
                with_nan[i] = f32::NAN;
            }
            let group = |x: &[f32], o: usize, i: usize| -> Vec<f32> {
                (0..r).map(|k| x[(o * r + k) * inner + i]).collect()
            };
            let ops: Vec<(&str, Factory, bool, Reference)> = vec![
                (
                    "ReduceSum",
                    reduce_sum,
                    false,
                    Box::new(move |v| plain_or_pairwise(v, |a| a)),
                ),
                (
                    "ReduceMean",
                    reduce_mean,
                    false,
                    Box::new(move |v| (plain_or_pairwise(v, |a| a) as f64 / v.len() as f64) as f32),
                ),
                (
                    "ReduceL1",
                    reduce_l1,
                    false,
                    Box::new(move |v| plain_or_pairwise(v, f32::abs)),
                ),
                (
                    "ReduceSumSquare",
                    reduce_sum_square,
                    false,
                    Box::new(move |v| plain_or_pairwise(v, |a| a * a)),
                ),
                (
                    "ReduceProd",
                    reduce_prod,
                    false,
                    Box::new(|v| v.iter().fold(1.0f32, |p, &a| p * (1.0 + a / 1e4))),
                ),
                (
                    "ReduceMax",
                    reduce_max,
                    true,
                    Box::new(|v| {
                        v.iter()
                            .fold(f32::NEG_INFINITY, |m, &a| if a > m { a } else { m })
                    }),
                ),
                (
                    "ReduceMin",
                    reduce_min,
                    true,
                    Box::new(|v| {
                        v.iter()
                            .fold(f32::INFINITY, |m, &a| if a < m { a } else { m })
                    }),
                ),
            ];
            for (op, factory, nan, reference) in ops {
                // Products of values near 1 (no overflow to infinity over 4100 of them).
                let data: Vec<f32> = match op {
                    "ReduceProd" => x.iter().map(|&a| 1.0 + a / 1e4).collect(),
                    _ if nan => with_nan.clone(),
                    _ => x.clone(),
                };
                let node = NodeSpec::onnx(op, 11)
                    .attr("axes", AttrValue::Ints(axes.to_vec()))
                    .attr("keepdims", AttrValue::Int(0));
                let tx = HostTensor::from_vec(shape, &data).expect("x");
                let got = run_kernel(factory, &node, &[&tx], None).expect("run")[0]
                    .to_vec::<f32>()
                    .expect("y");
                let source = if op == "ReduceProd" { &x } else { &data };
                let want: Vec<f32> = (0..outer * inner)
                    .map(|j| reference(&group(source, j / inner, j % inner)))
                    .collect();
                let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{op} {shape:?} {axes:?}");
            }
        }
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

    /// ArgMax/ArgMin over f32 along a middle axis (the blocked rows of `arg_rows_f32`) give
    /// the indices of the general loop, which f64 takes: ties both ways, NaN first and later,
    /// blocks cut by the outer slices and by a chunk's end, every axis.
    #[test]
    fn blocked_arg_reductions_match_the_general_loop() {
        let shape = [3usize, 7, 5, 70];
        let x: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|i| match i % 29 {
                0 => f32::NAN,
                k => (k % 6) as f32 - 2.0,
            })
            .collect();
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let (t32, t64) = (
            HostTensor::from_vec(&shape, &x).expect("x"),
            HostTensor::from_vec(&shape, &x64).expect("x"),
        );
        for axis in 0..4 {
            for (f, op) in [
                (argmax_factory as Factory, "ArgMax"),
                (argmin_factory, "ArgMin"),
            ] {
                for last in [0, 1] {
                    let node = NodeSpec::onnx(op, 13)
                        .attr("axis", AttrValue::Int(axis))
                        .attr("select_last_index", AttrValue::Int(last));
                    let run = |t: &HostTensor| {
                        run_kernel(f, &node, &[t], None).expect("run")[0]
                            .to_vec::<i64>()
                            .expect("i64")
                    };
                    assert_eq!(run(&t32), run(&t64), "{op} axis {axis} last {last}");
                }
            }
        }
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
mod topk_scan_tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    /// A few of many (one pass keeping the best k) equals a whole sort by value, NaN as the
    /// largest, ties by index: k of 1, 5 and 64 from rows of 1000 with repeated values and
    /// NaN, largest and smallest, along the last axis and along the first (strided lanes).
    #[test]
    fn top_few_of_many_equal_a_whole_sort() {
        let (rows, n) = (3usize, 1000usize);
        let mut x: Vec<f32> = (0..rows * n)
            .map(|i| ((i * 7919) % 211) as f32 - 100.0)
            .collect();
        for i in (17..x.len()).step_by(97) {
            x[i] = f32::NAN;
        }
        let key = |v: f32| if v.is_nan() { f32::INFINITY } else { v };
        for (shape, axis) in [([rows, n], 1i64), ([n, rows], 0)] {
            let data: Vec<f32> = if axis == 1 {
                x.clone()
            } else {
                (0..n * rows)
                    .map(|p| x[(p % rows) * n + p / rows])
                    .collect()
            };
            let tx = HostTensor::from_vec(&shape, &data).expect("x");
            for k in [1usize, 5, 64] {
                for largest in [1i64, 0] {
                    let kt = HostTensor::from_vec(&[1], &[k as i64]).expect("k");
                    let node = NodeSpec::onnx("TopK", 11)
                        .attr("axis", AttrValue::Int(axis))
                        .attr("largest", AttrValue::Int(largest))
                        .outputs(2);
                    let out = run_kernel(topk_factory, &node, &[&tx, &kt], None).expect("run");
                    let (vals, idx) = (
                        out[0].to_vec::<f32>().expect("v"),
                        out[1].to_vec::<i64>().expect("i"),
                    );
                    for r in 0..rows {
                        let mut lane: Vec<(f32, usize)> =
                            (0..n).map(|j| (x[r * n + j], j)).collect();
                        lane.sort_by(|a, b| {
                            let c = key(a.0).total_cmp(&key(b.0));
                            let c = if largest == 1 { c.reverse() } else { c };
                            c.then(a.1.cmp(&b.1))
                        });
                        let at = |j: usize| if axis == 1 { r * k + j } else { j * rows + r };
                        for (j, &(v, i)) in lane.iter().take(k).enumerate() {
                            assert_eq!(idx[at(j)], i as i64, "k {k} largest {largest} axis {axis}");
                            assert_eq!(vals[at(j)].to_bits(), v.to_bits());
                        }
                    }
                }
            }
        }
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
