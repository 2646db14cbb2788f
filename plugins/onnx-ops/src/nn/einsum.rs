//! Einsum: diagonals and lone labels summed out first, then operands contracted pairwise
//! (left to right) as batched gemms through the BLAS backend, then the result laid out in the
//! output's label order. f32 goes through BLAS (f16 and bf16 widened to f32); f64 and the
//! integer types (wrapping, as numpy's) through plain loops.
//!
//! Operands are borrowed, not copied, while their labels are already in the order a step
//! needs, and an operand whose two matrix dimensions are the other way round goes to the gemm
//! transposed instead of rearranged: attention's `bhqd,bhkd->bhqk` copied both inputs, then
//! rearranged the second element by element, then ran its 96 products one after another,
//! 8.5x ONNX Runtime (8x12x128x64). The products of a batch run as parallel tasks, as
//! MatMul's.

use super::matmul::gemm_f32;
use crate::nn::Disjoint;
use crate::util::{numel, product_sat, row_major_strides, walk_offsets};
use opreg_sdk::{
    alloc::{try_vec, try_with_capacity},
    prelude::*,
};
use std::{borrow::Cow, collections::BTreeMap};

/// A label: a letter's byte, or `ELLIPSIS + i` for the i-th broadcast dimension (aligned
/// right across operands).
type Label = u32;
const ELLIPSIS: Label = 1000;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Letter(u8),
    Ellipsis,
}

fn parse_term(op_term: &str) -> Result<Vec<Token>, PluginError> {
    let b = op_term.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_alphabetic() {
            out.push(Token::Letter(b[i]));
            i += 1;
        } else if b[i..].starts_with(b"...") {
            if out.contains(&Token::Ellipsis) {
                return Err(PluginError::invalid(format!(
                    "Einsum: term '{op_term}' has two ellipses"
                )));
            }
            out.push(Token::Ellipsis);
            i += 3;
        } else {
            return Err(PluginError::invalid(format!(
                "Einsum: unexpected character '{}' in term '{op_term}'",
                b[i] as char
            )));
        }
    }
    Ok(out)
}

#[derive(Clone)]
struct Einsum {
    inputs: Vec<Vec<Token>>,
    output: Option<Vec<Token>>,
}

fn einsum_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let eq: String = node
        .string_or("equation", "")?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if eq.is_empty() {
        return Err(PluginError::invalid(
            "Einsum: attribute 'equation' is required",
        ));
    }
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let inputs = lhs
        .split(',')
        .map(parse_term)
        .collect::<Result<Vec<_>, _>>()?;
    let output = rhs.map(parse_term).transpose()?;
    if let Some(out) = &output {
        for (i, t) in out.iter().enumerate() {
            if out[..i].contains(t) {
                return Err(PluginError::invalid(format!(
                    "Einsum: output label {t:?} appears twice in '{eq}'"
                )));
            }
        }
    }
    Ok(Box::new(Einsum { inputs, output }))
}

/// An element type Einsum computes in.
trait EinElem: Element + Default {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// `c[..m*n] = op(a) * op(b)` (row-major), `op(a)` `m x k` (`a` stored `k x m` when
    /// `ta`), `op(b)` `k x n` (`b` stored `n x k` when `tb`).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        _ctx: &KernelContext<'_>,
        (ta, tb): (bool, bool),
        m: usize,
        n: usize,
        k: usize,
        a: &[Self],
        b: &[Self],
        c: &mut [Self],
    ) -> Result<(), PluginError> {
        for i in 0..m {
            for j in 0..n {
                let mut acc = Self::default();
                for p in 0..k {
                    let x = if ta { a[p * m + i] } else { a[i * k + p] };
                    let y = if tb { b[j * k + p] } else { b[p * n + j] };
                    acc = acc.add(x.mul(y));
                }
                c[i * n + j] = acc;
            }
        }
        Ok(())
    }
}

impl EinElem for f32 {
    fn add(self, o: f32) -> f32 {
        self + o
    }
    fn mul(self, o: f32) -> f32 {
        self * o
    }
    fn gemm(
        ctx: &KernelContext<'_>,
        (ta, tb): (bool, bool),
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
    ) -> Result<(), PluginError> {
        gemm_f32(ctx, "Einsum", ta, tb, m, n, k, 1.0, a, b, 0.0, c, None)
    }
}

impl EinElem for f64 {
    fn add(self, o: f64) -> f64 {
        self + o
    }
    fn mul(self, o: f64) -> f64 {
        self * o
    }
}

macro_rules! ein_int {
    ($($t:ty),*) => {$(
        impl EinElem for $t {
            fn add(self, o: $t) -> $t {
                self.wrapping_add(o)
            }
            fn mul(self, o: $t) -> $t {
                self.wrapping_mul(o)
            }
        }
    )*};
}
ein_int!(u8, u16, u32, u64, i8, i16, i32, i64);

/// An operand: contiguous data (an input's, borrowed, or a step's result) with one unique
/// label per dimension.
struct Operand<'a, T: Clone> {
    labels: Vec<Label>,
    shape: Vec<usize>,
    data: Cow<'a, [T]>,
}

impl<'a, T: EinElem> Operand<'a, T> {
    fn strides(&self) -> Vec<usize> {
        row_major_strides(&self.shape)
    }

    /// The data laid out with dimensions `order` (each a label of `self`, or a label it
    /// lacks, broadcast) at the sizes in `sizes`; size-1 dimensions broadcast. Broadcasting
    /// can make this far larger than the operand: allocated fallibly.
    fn arrange(
        &self,
        order: &[Label],
        sizes: &BTreeMap<Label, usize>,
    ) -> Result<Vec<T>, PluginError> {
        let st = self.strides();
        let shape: Vec<usize> = order.iter().map(|l| sizes[l]).collect();
        let strides: Vec<usize> = order
            .iter()
            .map(|l| match self.labels.iter().position(|m| m == l) {
                Some(d) if self.shape[d] != 1 => st[d],
                _ => 0,
            })
            .collect();
        let len = numel(&shape)?;
        let mut out = try_with_capacity(len)?;
        walk_offsets(&shape, &strides, 0, len, |o| out.push(self.data[o]));
        Ok(out)
    }

    /// Sums out the dimensions whose labels are in `drop`.
    fn sum_out(
        self,
        drop: &[Label],
        sizes: &BTreeMap<Label, usize>,
    ) -> Result<Operand<'a, T>, PluginError> {
        if !self.labels.iter().any(|l| drop.contains(l)) {
            return Ok(self);
        }
        let keep: Vec<Label> = self
            .labels
            .iter()
            .copied()
            .filter(|l| !drop.contains(l))
            .collect();
        let gone: Vec<Label> = self
            .labels
            .iter()
            .copied()
            .filter(|l| drop.contains(l))
            .collect();
        let mut order = keep.clone();
        order.extend(&gone);
        let mut local = sizes.clone();
        for (l, &s) in self.labels.iter().zip(&self.shape) {
            local.insert(*l, s);
        }
        let data = self.arrange(&order, &local)?;
        let block = product_sat(&gone.iter().map(|l| local[l]).collect::<Vec<_>>());
        let shape: Vec<usize> = keep.iter().map(|l| local[l]).collect();
        let data = if block == 0 {
            // Summing over an empty extent: zeros, as many as the kept extents say.
            try_vec(numel(&shape)?, T::default())?
        } else {
            data.chunks(block)
                .map(|c| c.iter().fold(T::default(), |acc, &v| acc.add(v)))
                .collect()
        };
        Ok(Operand {
            labels: keep,
            shape,
            data: Cow::Owned(data),
        })
    }

    /// How the data already is as a batch of matrices `batch x rows x cols` (labels in that
    /// order: `Some(false)`; `batch x cols x rows`: `Some(true)`, transposed), each label at
    /// its full extent (no broadcasting); `None` when it must be rearranged.
    fn layout_as(
        &self,
        batch: &[Label],
        rows: &[Label],
        cols: &[Label],
        sizes: &BTreeMap<Label, usize>,
    ) -> Option<bool> {
        let full = self
            .labels
            .iter()
            .zip(&self.shape)
            .all(|(l, &s)| sizes.get(l) == Some(&s));
        let is = |order: &[&[Label]]| self.labels.iter().eq(order.iter().flat_map(|ls| ls.iter()));
        if !full {
            None
        } else if is(&[batch, rows, cols]) {
            Some(false)
        } else if is(&[batch, cols, rows]) {
            Some(true)
        } else {
            None
        }
    }

    /// The data with its dimensions in `order` at the extents of `sizes`: its own when they
    /// already are, else [`arrange`](Self::arrange)d.
    fn into_order(
        self,
        order: &[Label],
        sizes: &BTreeMap<Label, usize>,
    ) -> Result<Cow<'a, [T]>, PluginError> {
        let same = self.labels == order
            && self
                .labels
                .iter()
                .zip(&self.shape)
                .all(|(l, &s)| sizes.get(l) == Some(&s));
        if same {
            Ok(self.data)
        } else {
            Ok(Cow::Owned(self.arrange(order, sizes)?))
        }
    }
}

impl Einsum {
    fn expand(
        &self,
        term: &[Token],
        rank: usize,
        max_ellipsis: usize,
    ) -> Result<Vec<Label>, PluginError> {
        let letters = term.iter().filter(|t| **t != Token::Ellipsis).count();
        let has_ellipsis = term.contains(&Token::Ellipsis);
        if rank < letters || (!has_ellipsis && rank != letters) {
            return Err(PluginError::invalid(format!(
                "Einsum: term with {letters} labels does not fit an operand of rank {rank}"
            )));
        }
        let e = rank - letters;
        let mut labels = Vec::with_capacity(rank);
        for t in term {
            match t {
                Token::Letter(c) => labels.push(*c as Label),
                Token::Ellipsis => {
                    labels.extend((0..e).map(|i| ELLIPSIS + (max_ellipsis - e + i) as Label))
                }
            }
        }
        Ok(labels)
    }
}

impl Einsum {
    /// The output shape and data, computed in `T` on the operands `data` (the inputs' data).
    fn eval<'d, T: EinElem>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
        data: &[&'d [T]],
    ) -> Result<(Vec<usize>, Cow<'d, [T]>), PluginError> {
        if inputs.len() != self.inputs.len() {
            return Err(PluginError::invalid(format!(
                "Einsum: the equation has {} operands, the node {}",
                self.inputs.len(),
                inputs.len()
            )));
        }
        let max_e = inputs
            .iter()
            .zip(&self.inputs)
            .map(|(v, t)| {
                v.rank()
                    .saturating_sub(t.iter().filter(|t| **t != Token::Ellipsis).count())
            })
            .max()
            .unwrap_or(0);
        // Labels and sizes of every operand.
        let mut sizes: BTreeMap<Label, usize> = BTreeMap::new();
        let mut ops = Vec::with_capacity(inputs.len());
        for (v, term) in inputs.iter().zip(&self.inputs) {
            let labels = self.expand(term, v.rank(), max_e)?;
            for (&l, &s) in labels.iter().zip(v.shape()) {
                let e = sizes.entry(l).or_insert(s);
                if *e != s {
                    if *e == 1 {
                        *e = s;
                    } else if s != 1 {
                        return Err(PluginError::invalid(format!(
                            "Einsum: label {} has extents {} and {s}",
                            label_name(l),
                            *e
                        )));
                    }
                }
            }
            ops.push((labels, v));
        }
        let out_labels: Vec<Label> = match &self.output {
            Some(term) => {
                let mut out = Vec::new();
                for t in term {
                    match t {
                        Token::Letter(c) => {
                            let l = *c as Label;
                            if !sizes.contains_key(&l) {
                                return Err(PluginError::invalid(format!(
                                    "Einsum: output label '{}' is not in any input",
                                    *c as char
                                )));
                            }
                            out.push(l);
                        }
                        Token::Ellipsis => out.extend((0..max_e).map(|i| ELLIPSIS + i as Label)),
                    }
                }
                out
            }
            None => {
                // Implicit: broadcast dims, then the letters used once, alphabetically.
                let mut out: Vec<Label> = (0..max_e).map(|i| ELLIPSIS + i as Label).collect();
                let mut counts: BTreeMap<Label, usize> = BTreeMap::new();
                for (labels, _) in &ops {
                    for &l in labels.iter().filter(|&&l| l < ELLIPSIS) {
                        *counts.entry(l).or_default() += 1;
                    }
                }
                out.extend(counts.iter().filter(|(_, &c)| c == 1).map(|(&l, _)| l));
                out
            }
        };
        // Each operand with unique labels (diagonals taken).
        let mut operands = Vec::with_capacity(ops.len());
        for ((labels, v), &x) in ops.iter().zip(data) {
            let shape = v.shape();
            let st = row_major_strides(shape);
            let mut uniq: Vec<Label> = Vec::new();
            let mut ushape = Vec::new();
            let mut ustrides: Vec<usize> = Vec::new();
            for (d, &l) in labels.iter().enumerate() {
                match uniq.iter().position(|&u| u == l) {
                    Some(i) => {
                        if ushape[i] != shape[d] {
                            return Err(PluginError::invalid(format!(
                                "Einsum: repeated label {} has extents {} and {}",
                                label_name(l),
                                ushape[i],
                                shape[d]
                            )));
                        }
                        ustrides[i] += st[d];
                    }
                    None => {
                        uniq.push(l);
                        ushape.push(shape[d]);
                        ustrides.push(st[d]);
                    }
                }
            }
            let data = if uniq.len() == labels.len() {
                Cow::Borrowed(x)
            } else {
                // A diagonal: no larger than the operand.
                let len = product_sat(&ushape);
                let mut d = try_with_capacity(len)?;
                walk_offsets(&ushape, &ustrides, 0, len, |o| d.push(x[o]));
                Cow::Owned(d)
            };
            operands.push(Operand {
                labels: uniq,
                shape: ushape,
                data,
            });
        }
        // Contract left to right.
        let n = operands.len();
        let mut rest = operands;
        let later = |k: usize, rest: &[Operand<T>]| -> Vec<Label> {
            let mut keep = out_labels.clone();
            for o in &rest[k..] {
                keep.extend(&o.labels);
            }
            keep
        };
        let mut acc = rest.remove(0);
        let drop: Vec<Label> = acc
            .labels
            .iter()
            .copied()
            .filter(|l| !later(0, &rest).contains(l))
            .collect();
        acc = acc.sum_out(&drop, &sizes)?;
        for _ in 1..n {
            let b = rest.remove(0);
            let keep = later(0, &rest);
            let drop_b: Vec<Label> = b
                .labels
                .iter()
                .copied()
                .filter(|l| !keep.contains(l) && !acc.labels.contains(l))
                .collect();
            let b = b.sum_out(&drop_b, &sizes)?;
            acc = contract(ctx, &acc, &b, &keep, &sizes)?;
        }
        let drop: Vec<Label> = acc
            .labels
            .iter()
            .copied()
            .filter(|l| !out_labels.contains(l))
            .collect();
        acc = acc.sum_out(&drop, &sizes)?;
        let out_shape: Vec<usize> = out_labels.iter().map(|l| sizes[l]).collect();
        Ok((out_shape, acc.into_order(&out_labels, &sizes)?))
    }

    fn write<T: EinElem>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let data = inputs
            .iter()
            .map(|v| v.as_slice::<T>())
            .collect::<Result<Vec<_>, _>>()?;
        let (shape, y) = self.eval::<T>(ctx, inputs, &data)?;
        ctx.output_slice::<T>(0, &shape)?.copy_from_slice(&y);
        Ok(())
    }

    /// f16 / bf16: computed in f32.
    fn write_half<T: Element>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
        load: fn(T) -> f32,
        store: fn(f32) -> T,
    ) -> Result<(), PluginError> {
        let wide = inputs
            .iter()
            .map(|v| Ok(v.as_slice::<T>()?.iter().map(|&x| load(x)).collect()))
            .collect::<Result<Vec<Vec<f32>>, PluginError>>()?;
        let data: Vec<&[f32]> = wide.iter().map(|v| v.as_slice()).collect();
        let (shape, y) = self.eval::<f32>(ctx, inputs, &data)?;
        let out = ctx.output_slice::<T>(0, &shape)?;
        out.iter_mut()
            .zip(y.iter())
            .for_each(|(o, &v)| *o = store(v));
        Ok(())
    }
}

impl Kernel for Einsum {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        use opreg_sdk::half::{bf16, f16};
        crate::util::all_present("Einsum", inputs, 1)?;
        let dtype = inputs.first().map_or(DType::F32, |v| v.dtype);
        if let Some(v) = inputs.iter().find(|v| v.dtype != dtype) {
            return Err(PluginError::invalid(format!(
                "Einsum: operands mix {dtype} and {}",
                v.dtype
            )));
        }
        match dtype {
            DType::F32 => self.write::<f32>(ctx, inputs),
            DType::F64 => self.write::<f64>(ctx, inputs),
            DType::F16 => self.write_half(ctx, inputs, f16::to_f32, f16::from_f32),
            DType::BF16 => self.write_half(ctx, inputs, bf16::to_f32, bf16::from_f32),
            DType::U8 => self.write::<u8>(ctx, inputs),
            DType::U16 => self.write::<u16>(ctx, inputs),
            DType::U32 => self.write::<u32>(ctx, inputs),
            DType::U64 => self.write::<u64>(ctx, inputs),
            DType::I8 => self.write::<i8>(ctx, inputs),
            DType::I16 => self.write::<i16>(ctx, inputs),
            DType::I32 => self.write::<i32>(ctx, inputs),
            DType::I64 => self.write::<i64>(ctx, inputs),
            other => Err(PluginError::unimplemented(format!(
                "Einsum is not implemented for {other}"
            ))),
        }
    }
}

fn label_name(l: Label) -> String {
    if l >= ELLIPSIS {
        format!("...[{}]", l - ELLIPSIS)
    } else {
        format!("'{}'", l as u8 as char)
    }
}

/// `o` as a batch of matrices `batch x rows x cols`: its own data where its labels allow
/// (transposed: `true`), else rearranged.
fn as_matrices<'o, T: EinElem>(
    o: &'o Operand<'_, T>,
    batch: &[Label],
    rows: &[Label],
    cols: &[Label],
    sizes: &BTreeMap<Label, usize>,
) -> Result<(Cow<'o, [T]>, bool), PluginError> {
    Ok(match o.layout_as(batch, rows, cols, sizes) {
        Some(t) => (Cow::Borrowed(&o.data[..]), t),
        None => {
            let order: Vec<Label> = batch.iter().chain(rows).chain(cols).copied().collect();
            (Cow::Owned(o.arrange(&order, sizes)?), false)
        }
    })
}

/// `a` and `b` contracted over their shared labels that are not in `keep`; shared labels in
/// `keep` are batch dimensions. Labels of one side only must be in `keep` (summed before).
fn contract<'a, T: EinElem>(
    ctx: &KernelContext<'_>,
    a: &Operand<'_, T>,
    b: &Operand<'_, T>,
    keep: &[Label],
    sizes: &BTreeMap<Label, usize>,
) -> Result<Operand<'a, T>, PluginError> {
    let shared = |l: &Label| b.labels.contains(l);
    let batch: Vec<Label> = a
        .labels
        .iter()
        .copied()
        .filter(|l| shared(l) && keep.contains(l))
        .collect();
    let con: Vec<Label> = a
        .labels
        .iter()
        .copied()
        .filter(|l| shared(l) && !keep.contains(l))
        .collect();
    let left: Vec<Label> = a.labels.iter().copied().filter(|l| !shared(l)).collect();
    let right: Vec<Label> = b
        .labels
        .iter()
        .copied()
        .filter(|l| !a.labels.contains(l))
        .collect();
    // Extents from the operands' shapes: an outer product or an empty contraction can make
    // the result far larger than the operands, so its size is checked and allocated fallibly.
    let prod = |ls: &[Label]| numel(&ls.iter().map(|l| sizes[l]).collect::<Vec<_>>());
    let (nb, m, k, n) = (prod(&batch)?, prod(&left)?, prod(&con)?, prod(&right)?);
    let (am, ta) = as_matrices(a, &batch, &left, &con, sizes)?;
    let (bm, tb) = as_matrices(b, &batch, &con, &right, sizes)?;
    let mut out = try_vec(numel(&[nb, m, n])?, T::default())?;
    if m == 1 && n == 1 && k == 1 {
        // Pure elementwise product: no matrix to speak of.
        for ((o, &x), &y) in out.iter_mut().zip(am.iter()).zip(bm.iter()) {
            *o = x.mul(y);
        }
    } else if m > 0 && n > 0 {
        // One task per product (attention's per-head products are each too small to keep two
        // threads busy inside the gemm), as MatMul's.
        let od = Disjoint::new(&mut out);
        ctx.parallel_for(nb, 1, |range| {
            for bi in range {
                // SAFETY: product `bi` writes its own block of `out`.
                let ob = unsafe { od.part(bi * m * n, m * n) };
                T::gemm(
                    ctx,
                    (ta, tb),
                    m,
                    n,
                    k,
                    &am[bi * m * k..],
                    &bm[bi * k * n..],
                    ob,
                )?;
            }
            Ok(())
        })?;
    }
    let labels: Vec<Label> = batch.iter().chain(&left).chain(&right).copied().collect();
    let shape = labels.iter().map(|l| sizes[l]).collect();
    Ok(Operand {
        labels,
        shape,
        data: Cow::Owned(out),
    })
}

pub fn register(r: &mut Registrar) {
    use opreg_sdk::dtype::names::*;
    use opreg_sdk::numeric::NUMERIC;
    // Up to opset 27 the schema lists every numeric type but bf16, which opset 28 adds.
    const NO_BF16: &[DType] = &[U8, U16, U32, U64, I8, I16, I32, I64, F16, F32, F64];
    for (since, end, types) in [(12, 27, NO_BF16), (28, OPEN_END, NUMERIC)] {
        r.kernel(
            KernelDesc::onnx("Einsum", since, end)
                .constraint("T", types)
                .inputs(&["T"])
                .outputs(&["T"]),
            einsum_factory,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testblas::NaiveBlas;
    use opreg_sdk::{
        half::bf16,
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 17 + seed * 5) % 13) as f32 - 6.0) / 4.0)
            .collect()
    }

    /// Brute force over every assignment of the letters (no ellipsis).
    fn naive(terms: &[&str], out: &str, sizes: &BTreeMap<u8, usize>, xs: &[Vec<f32>]) -> Vec<f32> {
        let letters: Vec<u8> = sizes.keys().copied().collect();
        let total: usize = sizes.values().product();
        let out_b = out.as_bytes();
        let out_len: usize = out_b.iter().map(|c| sizes[c]).product();
        let mut y = vec![0.0f32; out_len];
        for flat in 0..total {
            let mut val = BTreeMap::new();
            let mut rem = flat;
            for l in letters.iter().rev() {
                val.insert(*l, rem % sizes[l]);
                rem /= sizes[l];
            }
            let index = |term: &[u8]| term.iter().fold(0, |acc, c| acc * sizes[c] + val[c]);
            let mut p = 1.0;
            for (t, x) in terms.iter().zip(xs) {
                p *= x[index(t.as_bytes())];
            }
            y[index(out_b)] += p;
        }
        y
    }

    fn close(a: &[f32], b: &[f32]) {
        crate::util::testing::assert_close(a, b, 1e-4);
    }

    fn run(eq: &str, inputs: &[(&[usize], &[f32])]) -> (Vec<usize>, Vec<f32>) {
        let ts: Vec<HostTensor> = inputs
            .iter()
            .map(|(s, v)| HostTensor::from_vec(s, v).expect("x"))
            .collect();
        let refs: Vec<&HostTensor> = ts.iter().collect();
        let out = run_kernel(
            einsum_factory,
            &NodeSpec::onnx("Einsum", 12).attr("equation", AttrValue::String(eq.into())),
            &refs,
            Some(Box::new(NaiveBlas)),
        )
        .expect("run");
        (
            out[0].shape().to_vec(),
            out[0].to_vec::<f32>().expect("f32"),
        )
    }

    #[test]
    fn einsum_matches_brute_force() {
        let sizes: BTreeMap<u8, usize> = [(b'a', 2), (b'b', 3), (b'c', 4), (b'd', 2), (b'e', 3)]
            .into_iter()
            .collect();
        // (equation, input terms, output term)
        let cases: [(&str, &[&str], &str); 16] = [
            ("ab,bc->ac", &["ab", "bc"], "ac"),
            // Batched, each side as it is, transposed or not (attention's `bhqd,bhkd->bhqk`).
            ("dba,dbc->dac", &["dba", "dbc"], "dac"),
            ("dab,dcb->dac", &["dab", "dcb"], "dac"),
            ("dba,dcb->dac", &["dba", "dcb"], "dac"),
            ("adb,dcb->dac", &["adb", "dcb"], "dac"),
            ("ab,bc", &["ab", "bc"], "ac"),
            ("dab,dbc->dac", &["dab", "dbc"], "dac"),
            ("ab->ba", &["ab"], "ba"),
            ("ab->", &["ab"], ""),
            ("b,b->", &["b", "b"], ""),
            ("a,b->ab", &["a", "b"], "ab"),
            ("ab,ab->ab", &["ab", "ab"], "ab"),
            ("abc,cd,de->abe", &["abc", "cd", "de"], "abe"),
            ("ba,dac,cb->db", &["ba", "dac", "cb"], "db"),
            ("abc->cb", &["abc"], "cb"),
            ("ab,cd->", &["ab", "cd"], ""),
        ];
        for (eq, terms, out) in cases {
            let xs: Vec<Vec<f32>> = terms
                .iter()
                .enumerate()
                .map(|(i, t)| data(t.bytes().map(|c| sizes[&c]).product(), i))
                .collect();
            let shapes: Vec<Vec<usize>> = terms
                .iter()
                .map(|t| t.bytes().map(|c| sizes[&c]).collect())
                .collect();
            let inputs: Vec<(&[usize], &[f32])> = shapes
                .iter()
                .zip(&xs)
                .map(|(s, x)| (s.as_slice(), x.as_slice()))
                .collect();
            let (shape, y) = run(eq, &inputs);
            let want_shape: Vec<usize> = out.bytes().map(|c| sizes[&c]).collect();
            assert_eq!(shape, want_shape, "{eq}");
            let used: BTreeMap<u8, usize> = sizes
                .iter()
                .filter(|(c, _)| terms.iter().any(|t| t.as_bytes().contains(c)))
                .map(|(&c, &s)| (c, s))
                .collect();
            close(&y, &naive(terms, out, &used, &xs));
        }
    }

    #[test]
    fn einsum_diagonal_trace_and_ellipsis() {
        let x: Vec<f32> = (0..9).map(|i| i as f32).collect();
        assert_eq!(
            run("ii->i", &[(&[3, 3], &x)]),
            (vec![3], vec![0.0, 4.0, 8.0])
        );
        assert_eq!(run("ii", &[(&[3, 3], &x)]), (vec![], vec![12.0]));
        // Batch matmul through the ellipsis, with broadcasting of a unit batch dim.
        let a = data(2 * 3 * 4, 1);
        let b = data(3 * 4 * 5, 2);
        let (shape, y) = run(
            "...ij,...jk->...ik",
            &[(&[2, 1, 3, 4], &a), (&[3, 4, 5], &b)],
        );
        assert_eq!(shape, vec![2, 3, 3, 5]);
        let mut want = Vec::new();
        for i in 0..2 {
            for j in 0..3 {
                want.extend(crate::nn::testblas::naive_matmul(
                    &a[i * 12..(i + 1) * 12],
                    &b[j * 20..(j + 1) * 20],
                    3,
                    4,
                    5,
                ));
            }
        }
        close(&y, &want);
        // Implicit output keeps the ellipsis dims first.
        let (shape, _) = run(
            "i...,ij",
            &[(&[4, 2], &data(8, 3)), (&[4, 5], &data(20, 4))],
        );
        assert_eq!(shape, vec![2, 5]);
    }

    #[test]
    fn einsum_errors() {
        let x = HostTensor::from_vec(&[2, 3], &[0.0f32; 6]).expect("x");
        let err = run_kernel(
            einsum_factory,
            &NodeSpec::onnx("Einsum", 12).attr("equation", AttrValue::String("abc->a".into())),
            &[&x],
            Some(Box::new(NaiveBlas)),
        )
        .expect_err("rank");
        assert!(err.message.contains("does not fit"), "{}", err.message);
        let err = run_kernel(
            einsum_factory,
            &NodeSpec::onnx("Einsum", 12).attr("equation", AttrValue::String("ab,ab->a".into())),
            &[&x, &HostTensor::from_vec(&[2, 2], &[0.0f32; 4]).expect("y")],
            Some(Box::new(NaiveBlas)),
        )
        .expect_err("extents");
        assert!(err.message.contains("extents"), "{}", err.message);
    }

    #[test]
    fn einsum_official_cases() {
        crate::testcases::run_cases_with(&["test_einsum_"], einsum_factory, || {
            Some(Box::new(NaiveBlas))
        });
    }

    #[test]
    fn einsum_other_types() {
        // "ij,jk->ik" on [[1,2],[3,4]] x [[5,6],[7,8]] = [[19,22],[43,50]], and "ii->" = 5.
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [5.0, 6.0, 7.0, 8.0];
        let node =
            |eq: &str| NodeSpec::onnx("Einsum", 28).attr("equation", AttrValue::String(eq.into()));
        let run = |eq: &str, ts: &[&HostTensor]| {
            run_kernel(einsum_factory, &node(eq), ts, Some(Box::new(NaiveBlas))).expect("run")
        };
        let ta = HostTensor::from_vec(&[2, 2], &a.map(|v| v as i16)).expect("a");
        let tb = HostTensor::from_vec(&[2, 2], &b.map(|v| v as i16)).expect("b");
        let y = run("ij,jk->ik", &[&ta, &tb]);
        assert_eq!(y[0].to_vec::<i16>().expect("i16"), vec![19, 22, 43, 50]);
        // Both sides transposed, by the loops: [[1,3],[2,4]] x [[5,7],[6,8]].
        let y = run("ji,kj->ik", &[&ta, &tb]);
        assert_eq!(y[0].to_vec::<i16>().expect("i16"), vec![23, 31, 34, 46]);
        assert_eq!(
            run("ii->", &[&ta])[0].to_vec::<i16>().expect("i16"),
            vec![5]
        );
        let ta = HostTensor::from_vec(&[2, 2], &a).expect("a");
        let tb = HostTensor::from_vec(&[2, 2], &b).expect("b");
        let y = run("ij,jk->ik", &[&ta, &tb]);
        assert_eq!(
            y[0].to_vec::<f64>().expect("f64"),
            vec![19.0, 22.0, 43.0, 50.0]
        );
        let h = |v: &[f64]| v.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>();
        let ta = HostTensor::from_vec(&[2, 2], &h(&a)).expect("a");
        let tb = HostTensor::from_vec(&[2, 2], &h(&b)).expect("b");
        let y = run("ij,jk->ik", &[&ta, &tb]);
        assert_eq!(
            y[0].to_vec::<bf16>().expect("bf16"),
            h(&[19.0, 22.0, 43.0, 50.0])
        );
    }

    /// An empty contraction ([2^20, 0] x [0, 2^20]) asks for 2^40 output elements: the call
    /// fails as too large (it used to abort on an infallible buffer), for f32 and f16.
    #[test]
    fn empty_contraction_with_huge_result_is_resource_exhausted() {
        let node =
            NodeSpec::onnx("Einsum", 12).attr("equation", AttrValue::String("ij,jk->ik".into()));
        let a = HostTensor::from_vec::<f32>(&[1 << 20, 0], &[]).expect("a");
        let b = HostTensor::from_vec::<f32>(&[0, 1 << 20], &[]).expect("b");
        let ah = HostTensor::from_vec::<opreg_sdk::half::f16>(&[1 << 20, 0], &[]).expect("a");
        let bh = HostTensor::from_vec::<opreg_sdk::half::f16>(&[0, 1 << 20], &[]).expect("b");
        for (a, b) in [(&a, &b), (&ah, &bh)] {
            let e = run_kernel(einsum_factory, &node, &[a, b], Some(Box::new(NaiveBlas)))
                .expect_err("too large");
            assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);
        }
        // Broadcast outer product of small operands into 2^40 elements.
        let outer =
            NodeSpec::onnx("Einsum", 12).attr("equation", AttrValue::String("i,j->ij".into()));
        let v = HostTensor::from_vec(&[1 << 20], &vec![1.0f32; 1 << 20]).expect("v");
        let e = run_kernel(einsum_factory, &outer, &[&v, &v], Some(Box::new(NaiveBlas)))
            .expect_err("too large");
        assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);
    }
}
