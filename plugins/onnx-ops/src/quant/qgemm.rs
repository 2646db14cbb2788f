//! ONNX Runtime's contrib `QGemm` (`com.microsoft`): `Y[i, j] = alpha * a_s * b_s[j] *
//! (Σ_k (A[i, k] - a_zp) (op(B)[k, j] - b_zp[j]) + C[i, j])`, C an optional int32 bias (at
//! scale `alpha * a_s * b_s`, as ONNX Runtime defines it), quantized at `y_scale` and
//! `y_zero_point` when they are given (u8/i8 out), f32 otherwise.
//!
//! The `qdq-gemm` pass writes it for a `DQ -> Gemm -> Q` (a quantized classifier's fully
//! connected head), so that the product runs on the bytes through the node's integer gemm with B
//! packed at load, instead of on dequantized f32 weights: a quarter of the memory read per run
//! (ResNet-50's 2048x1000 head: 2 MB instead of 8 MB; the node is bound by that read at batch 1).

use super::gemm::{bytes, zero_points, IntProduct};
use super::{read_f32, read_i32, Factory, Q8};
use crate::util::{input, numel, optional};
use opreg_sdk::alloc::try_vec;
use opreg_sdk::prelude::*;

const OP: &str = "QGemm";

pub(super) struct QGemm {
    alpha: f32,
    trans_b: bool,
    /// B packed once at model load by the node's BLAS backend, when B is constant: per block
    /// of [`BLOCK`] columns (the last one shorter).
    packed: Vec<PackedB>,
}

/// Columns of op(B) per packed block. At batch 1 the product is one row: the backend splits
/// its work by rows of A, so one call would run on one thread; the blocks run in parallel
/// instead (ResNet-50's 1000 columns: 6 blocks). A multiple of the VNNI kernel's 48-column
/// panels.
const BLOCK: usize = 192;

pub(super) fn factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    if node.int_or("transA", 0)? != 0 {
        return Err(PluginError::unimplemented(format!(
            "{OP}: transA = 1 is not supported"
        )));
    }
    let alpha = node.float_or("alpha", 1.0)?;
    let trans_b = node.int_or("transB", 0)? != 0;
    Ok(Box::new(QGemm {
        alpha,
        trans_b,
        packed: prepack(node, trans_b).unwrap_or_default(),
    }))
}

/// The constant B (zero point constant or absent) packed for the node's backend in blocks of
/// [`BLOCK`] columns; `None` when B is not constant or the backend does not pre-pack (a run
/// then packs as usual).
fn prepack(node: &NodeInfo<'_>, trans_b: bool) -> Option<Vec<PackedB>> {
    let a = node.inputs.first()?;
    let b = node.inputs.get(3)?.constant?;
    let zp = match node.inputs.get(5) {
        Some(z) if z.present => Some(z.constant?),
        _ => None,
    };
    let &[rows, cols] = b.shape() else {
        return None;
    };
    let (k, n) = if trans_b { (cols, rows) } else { (rows, cols) };
    let b_zp = zero_points(OP, zp.as_ref(), b.dtype, n).ok()??;
    let whole = IntProduct {
        m: 1,
        n,
        k,
        a: &[],
        a_type: a.dtype,
        lda: k,
        a_zp: 0,
        b: bytes(&b, OP).ok()?,
        b_type: b.dtype,
        ldb: cols,
        trans_b,
        b_zp: &b_zp,
    };
    (0..n)
        .step_by(BLOCK)
        .map(|j0| columns(&whole, j0, (j0 + BLOCK).min(n))?.pack(node))
        .collect()
}

/// `p` restricted to op(B)'s columns `j0..j1`: B's rows `j0..` when transposed, else its
/// columns from `j0` (the same row stride).
fn columns<'b>(p: &IntProduct<'b>, j0: usize, j1: usize) -> Option<IntProduct<'b>> {
    Some(IntProduct {
        n: j1.checked_sub(j0)?,
        b: p.b.get(if p.trans_b { j0 * p.ldb } else { j0 }..)?,
        b_zp: if p.b_zp.len() == 1 {
            p.b_zp
        } else {
            p.b_zp.get(j0..j1)?
        },
        ..*p
    })
}

/// A scalar input (a scale or a zero point) as f32.
fn scalar(t: &TensorView<'_>, name: &str) -> Result<f32, PluginError> {
    match read_f32(t, OP)?[..] {
        [v] => Ok(v),
        _ => Err(PluginError::invalid(format!(
            "{OP}: {name} must be a scalar, got shape {:?}",
            t.shape()
        ))),
    }
}

/// One zero point of `of`'s type, or 0 when absent.
fn scalar_zero_point(
    z: Option<&TensorView<'_>>,
    of: DType,
    name: &str,
) -> Result<i32, PluginError> {
    let Some(z) = z else { return Ok(0) };
    if z.dtype != of {
        return Err(PluginError::invalid(format!(
            "{OP}: {name} is {} but its tensor is {of}",
            z.dtype
        )));
    }
    match read_i32(z, OP)?[..] {
        [v] => Ok(v),
        _ => Err(PluginError::invalid(format!(
            "{OP}: {name} must be a scalar, got shape {:?}",
            z.shape()
        ))),
    }
}

impl QGemm {
    /// The product through the pre-packed column blocks, in parallel, into `c` (`m x n`).
    /// `Ok(false)` when the backend refuses them.
    fn run_blocks(
        &self,
        ctx: &KernelContext<'_>,
        product: &IntProduct<'_>,
        c: &mut [i32],
    ) -> Result<bool, PluginError> {
        let (m, n) = (product.m, product.n);
        let mut parts = opreg_sdk::alloc::try_with_capacity::<Vec<i32>>(self.packed.len())?;
        for bi in 0..self.packed.len() {
            let bn = BLOCK.min(n - bi * BLOCK);
            parts.push(try_vec(numel(&[m, bn])?, 0i32)?);
        }
        let failure = std::sync::Mutex::new(None);
        ctx.parallel_chunks(&mut parts, 1, |first, chunk| {
            for (i, part) in chunk.iter_mut().enumerate() {
                let bi = first + i;
                let j0 = bi * BLOCK;
                let result = match columns(product, j0, (j0 + BLOCK).min(n)) {
                    Some(q) => q.run_packed(ctx, part, q.n, self.packed.get(bi)),
                    None => Ok(false),
                };
                if !matches!(result, Ok(true)) {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(result);
                    }
                }
            }
        })?;
        if let Ok(Some(outcome)) = failure.into_inner() {
            return outcome;
        }
        for (bi, part) in parts.iter().enumerate() {
            let (j0, bn) = (bi * BLOCK, part.len() / m.max(1));
            for (crow, prow) in c.chunks_exact_mut(n).zip(part.chunks_exact(bn.max(1))) {
                crow[j0..j0 + bn].copy_from_slice(prow);
            }
        }
        Ok(true)
    }
}

impl Kernel for QGemm {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        if inputs.len() < 6 {
            return Err(PluginError::invalid(format!(
                "{OP}: expects 6 to 9 inputs, got {}",
                inputs.len()
            )));
        }
        let present = |i: usize| optional(inputs, i);
        let (a, b) = (&input(OP, inputs, 0, "A")?, &input(OP, inputs, 3, "B")?);
        let (&[m, k], &[rows, cols]) = (a.shape(), b.shape()) else {
            return Err(PluginError::invalid(format!(
                "{OP}: A and B must be 2-D, got {:?} and {:?}",
                a.shape(),
                b.shape()
            )));
        };
        let (kb, n) = if self.trans_b {
            (cols, rows)
        } else {
            (rows, cols)
        };
        if kb != k {
            return Err(PluginError::invalid(format!(
                "{OP}: A {:?} and B {:?}{} do not multiply",
                a.shape(),
                b.shape(),
                if self.trans_b { " (transposed)" } else { "" }
            )));
        }
        let a_s = scalar(&input(OP, inputs, 1, "a_scale")?, "a_scale")?;
        let a_zp = scalar_zero_point(present(2), a.dtype, "a_zero_point")?;
        let b_s = read_f32(&input(OP, inputs, 4, "b_scale")?, OP)?;
        if b_s.len() != 1 && b_s.len() != n {
            return Err(PluginError::invalid(format!(
                "{OP}: b_scale has {} values, expected 1 or {n} (one per column)",
                b_s.len()
            )));
        }
        let b_zp = zero_points(OP, present(5), b.dtype, n)?.ok_or_else(|| {
            PluginError::unimplemented(format!(
                "{OP}: b_zero_point must be a scalar or one per column ({n})"
            ))
        })?;
        let mn = numel(&[m, n])?;
        let mut c = try_vec(mn, 0i32)?;
        let (ab, bb) = (bytes(a, OP)?, bytes(b, OP)?);
        let product = IntProduct {
            m,
            n,
            k,
            a: ab,
            a_type: a.dtype,
            lda: k,
            a_zp,
            b: bb,
            b_type: b.dtype,
            ldb: cols,
            trans_b: self.trans_b,
            b_zp: &b_zp,
        };
        if ab.len() < numel(&[m, k])? || bb.len() < numel(&[rows, cols])? {
            return Err(PluginError::invalid(format!(
                "{OP}: A or B is shorter than its shape"
            )));
        }
        let blocked = !self.packed.is_empty()
            && n.div_ceil(BLOCK) == self.packed.len()
            && self.packed.iter().enumerate().all(|(bi, p)| {
                let j0 = bi * BLOCK;
                columns(&product, j0, (j0 + BLOCK).min(n)).is_some_and(|q| q.fits(p))
            });
        let done = if blocked {
            self.run_blocks(ctx, &product, &mut c)?
        } else {
            product.run(ctx, &mut c, n)?
        };
        if !done {
            // No backend for these operands: the sums directly.
            let (av, bv) = (read_i32(a, OP)?, read_i32(b, OP)?);
            for (i, row) in c.chunks_exact_mut(n.max(1)).enumerate() {
                for (j, acc) in row.iter_mut().enumerate() {
                    let zb = b_zp[if b_zp.len() == 1 { 0 } else { j }];
                    *acc = (0..k).fold(0i32, |s, kk| {
                        let w = bv[if self.trans_b {
                            j * cols + kk
                        } else {
                            kk * cols + j
                        }];
                        s.wrapping_add((av[i * k + kk] - a_zp).wrapping_mul(w - zb))
                    });
                }
            }
        }
        // C: one bias per column ([N], [1, N]), one for all (a scalar, [1, 1]), or per element
        // ([M, N]); added to the sums, whose scale it has.
        let mut bias = try_vec(n, 0i32)?;
        if let Some(ct) = present(6) {
            if ct.dtype != DType::I32 {
                return Err(PluginError::invalid(format!(
                    "{OP}: C must be int32, got {}",
                    ct.dtype
                )));
            }
            let cv = ct.as_slice::<i32>()?;
            match ct.shape() {
                s if cv.len() == 1 && s.len() <= 2 => bias.fill(cv[0]),
                [l] | [1, l] if *l == n => bias.copy_from_slice(cv),
                [rm, rn] if *rm == m && *rn == n => {
                    for (acc, &v) in c.iter_mut().zip(cv) {
                        *acc = acc.wrapping_add(v);
                    }
                }
                s => {
                    return Err(PluginError::invalid(format!(
                        "{OP}: C of shape {s:?} does not broadcast to [{m}, {n}]"
                    )))
                }
            }
        }
        let scale = |j: usize| self.alpha * a_s * b_s[if b_s.len() == 1 { 0 } else { j }];
        let Some(ys) = present(7) else {
            let out = ctx
                .output_to_overwrite(0, DType::F32, &[m, n])?
                .into_slice::<f32>()?;
            let scales: Vec<f32> = (0..n).map(scale).collect();
            for (orow, crow) in out.chunks_exact_mut(n.max(1)).zip(c.chunks_exact(n.max(1))) {
                for (j, (o, &acc)) in orow.iter_mut().zip(crow).enumerate() {
                    *o = acc.wrapping_add(bias[j]) as f32 * scales[j];
                }
            }
            return Ok(());
        };
        let y_s = scalar(ys, "y_scale")?;
        let (out_dtype, y_zp) = match present(8) {
            Some(z) => (
                z.dtype,
                scalar_zero_point(Some(z), z.dtype, "y_zero_point")?,
            ),
            None => (DType::U8, 0),
        };
        let (lo, hi) = match out_dtype {
            DType::U8 => (0, 255),
            DType::I8 => (-128, 127),
            other => {
                return Err(PluginError::invalid(format!(
                    "{OP}: y_zero_point must be u8 or i8, got {other}"
                )))
            }
        };
        // As QLinearConv: the multiplier in f32, the product and rounding of `requant_byte`.
        let mult: Vec<f32> = (0..n).map(|j| scale(j) / y_s).collect();
        let bounds = ((lo - y_zp) as f32, (hi - y_zp) as f32);
        let out = ctx
            .output_to_overwrite(0, out_dtype, &[m, n])?
            .into_bytes()?;
        crate::simd::requantize_rows(&c, &bias, &mult, y_zp, bounds, out);
        Ok(())
    }
}

pub(super) fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::new("com.microsoft", "QGemm", 1, OPEN_END)
            .constraint("TA", Q8)
            .constraint("TB", Q8)
            .constraint("TC", &[DType::I32])
            .constraint("TYZ", Q8)
            .constraint("TR", &[DType::U8, DType::I8, DType::F32])
            .constraint("T", &[DType::F32])
            .inputs(&["TA", "T", "TA", "TB", "T", "TB", "TC", "T", "TYZ"])
            .outputs(&["TR"]),
        factory as Factory,
    );
}
