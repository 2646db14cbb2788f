//! `MatMulInteger` and `QLinearMatMul`: integer matrix products with numpy-style batch
//! broadcasting, accumulated in `i32`.

use super::gemm::{bytes, zero_points, IntProduct};
use super::{fill_saturated, read_f32, read_i32, FLOATS, Q8};
use crate::util::{
    broadcast_shapes, broadcast_strides, input, numel, optional, product_sat, required,
    walk_offsets,
};
use opreg_sdk::alloc::{try_vec, try_with_capacity};
use opreg_sdk::half::{bf16, f16};
use opreg_sdk::prelude::*;

/// `t - zero_point` as `i32`. A 1-D zero point of length M for a matrix `[.., M, K]` is per
/// row (`per_row`); otherwise the zero point broadcasts against `t` numpy-style (scalar,
/// `[N]` per column of B, `[.., M, 1]`, `[.., 1, N]`).
pub(super) fn shifted(
    op: &str,
    name: &str,
    t: &TensorView<'_>,
    zp: Option<&TensorView<'_>>,
    per_row: bool,
) -> Result<Vec<i32>, PluginError> {
    let mut x = read_i32(t, op)?;
    let Some(z) = zp else { return Ok(x) };
    if z.dtype != t.dtype {
        return Err(PluginError::invalid(format!(
            "{op}: {name} is {} but its tensor is {}",
            z.dtype, t.dtype
        )));
    }
    let zv = read_i32(z, op)?;
    if zv.len() == 1 {
        x.iter_mut().for_each(|v| *v -= zv[0]);
        return Ok(x);
    }
    let mut zshape = z.shape().to_vec();
    if per_row && zshape.len() == 1 && t.rank() >= 2 {
        zshape.push(1);
    }
    let fits = zshape.len() <= t.rank()
        && broadcast_shapes(&[t.shape(), &zshape]).is_ok_and(|s| s == t.shape());
    if !fits {
        return Err(PluginError::invalid(format!(
            "{op}: {name} of shape {:?} does not fit its tensor of shape {:?}",
            z.shape(),
            t.shape()
        )));
    }
    let strides = broadcast_strides(&zshape, t.shape());
    let mut i = 0;
    walk_offsets(t.shape(), &strides, 0, x.len(), |o| {
        x[i] -= zv[o];
        i += 1;
    });
    Ok(x)
}

/// Shapes of a batched matrix product.
pub(super) struct MatDims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// Number of output batches.
    nb: usize,
    /// Offset of each output batch's A and B matrices (none when the output is empty).
    a_off: Vec<usize>,
    b_off: Vec<usize>,
    pub out_shape: Vec<usize>,
}

impl MatDims {
    pub(super) fn new(op: &str, a: &[usize], b: &[usize]) -> Result<Self, PluginError> {
        if a.is_empty() || b.is_empty() {
            return Err(PluginError::invalid(format!(
                "{op}: operands must have rank >= 1, got {a:?} and {b:?}"
            )));
        }
        let a2: Vec<usize> = if a.len() == 1 {
            vec![1, a[0]]
        } else {
            a.to_vec()
        };
        let b2: Vec<usize> = if b.len() == 1 {
            vec![b[0], 1]
        } else {
            b.to_vec()
        };
        let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
        let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
        if k != k2 {
            return Err(PluginError::invalid(format!(
                "{op}: inner dimensions differ, A is {a:?} and B is {b:?}"
            )));
        }
        let (ab, bb) = (&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
        let batch = broadcast_shapes(&[ab, bb]).map_err(|_| {
            PluginError::invalid(format!(
                "{op}: batch dims of {a:?} and {b:?} do not broadcast"
            ))
        })?;
        // Empty operands may carry huge batch extents: a saturating count (exact whenever
        // the output has elements), and offsets only for a non-empty output, fallibly.
        let nb = product_sat(&batch);
        let (mut a_off, mut b_off) = (Vec::new(), Vec::new());
        if m > 0 && n > 0 && nb > 0 {
            a_off = try_with_capacity(nb)?;
            b_off = try_with_capacity(nb)?;
            walk_offsets(&batch, &broadcast_strides(ab, &batch), 0, nb, |o| {
                a_off.push(o * m * k)
            });
            walk_offsets(&batch, &broadcast_strides(bb, &batch), 0, nb, |o| {
                b_off.push(o * k * n)
            });
        }
        let mut out_shape = batch;
        if a.len() > 1 {
            out_shape.push(m);
        }
        if b.len() > 1 {
            out_shape.push(n);
        }
        Ok(MatDims {
            m,
            k,
            n,
            nb,
            a_off,
            b_off,
            out_shape,
        })
    }

    /// Number of output elements (with K = 0, unbounded by the operands' sizes).
    pub(super) fn len(&self) -> Result<usize, PluginError> {
        numel(&[self.nb, self.m, self.n])
    }

    /// `out = (a - a_zp) @ (b - b_zp)` through the node's BLAS backend, one product per batch:
    /// `Ok(false)` (and nothing written) when the backend is missing or cannot take these
    /// operands (then the caller shifts and multiplies itself). The A zero point must be a
    /// scalar, B's a scalar or one per column.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_blas(
        &self,
        ctx: &KernelContext<'_>,
        op: &str,
        a: &TensorView<'_>,
        b: &TensorView<'_>,
        a_zp: Option<&TensorView<'_>>,
        b_zp: Option<&TensorView<'_>>,
        out: &mut [i32],
    ) -> Result<bool, PluginError> {
        if !matches!(a.dtype, DType::U8 | DType::I8) || !matches!(b.dtype, DType::U8 | DType::I8) {
            return Ok(false);
        }
        let (Some(za), Some(zb)) = (
            zero_points(op, a_zp, a.dtype, 1)?,
            zero_points(op, b_zp, b.dtype, self.n)?,
        ) else {
            return Ok(false);
        };
        let (m, k, n) = (self.m, self.k, self.n);
        if out.is_empty() {
            return Ok(true);
        }
        let (a_type, b_type) = (a.dtype, b.dtype);
        let (a, b) = (bytes(a, op)?, bytes(b, op)?);
        for (bi, c) in out.chunks_mut(m * n).enumerate() {
            let (Some(&ao), Some(&bo)) = (self.a_off.get(bi), self.b_off.get(bi)) else {
                return Err(PluginError::internal(format!(
                    "{op}: batch {bi} has no offsets"
                )));
            };
            let product = IntProduct {
                m,
                n,
                k,
                a: a.get(ao..).unwrap_or(&[]),
                a_type,
                lda: k,
                a_zp: za[0],
                b: b.get(bo..).unwrap_or(&[]),
                b_type,
                ldb: n,
                trans_b: false,
                b_zp: &zb,
            };
            // The backend's answer depends only on types and parameters, the same for every
            // batch: only the first can say no.
            if !product.run(ctx, c, n)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `out = a @ b` (wrapping `i32` arithmetic), rows in parallel.
    pub(super) fn run(
        &self,
        ctx: &KernelContext<'_>,
        a: &[i32],
        b: &[i32],
        out: &mut [i32],
    ) -> Result<(), PluginError> {
        let (m, k, n) = (self.m, self.k, self.n);
        if n == 0 || out.is_empty() {
            return Ok(());
        }
        let rows_per_chunk = (4096 / (k * n).max(1)).max(1);
        ctx.parallel_chunks(out, rows_per_chunk * n, |start, chunk| {
            for (r, row) in chunk.chunks_mut(n).enumerate() {
                let r = start / n + r;
                let (bi, i) = (r / m, r % m);
                let arow = &a[self.a_off[bi] + i * k..][..k];
                let bmat = &b[self.b_off[bi]..][..k * n];
                row.fill(0);
                for (kk, &av) in arow.iter().enumerate() {
                    if av == 0 {
                        continue;
                    }
                    for (o, &bv) in row.iter_mut().zip(&bmat[kk * n..(kk + 1) * n]) {
                        *o = o.wrapping_add(av.wrapping_mul(bv));
                    }
                }
            }
        })
    }
}

#[derive(Clone)]
pub(super) struct MatMulInteger;

impl Kernel for MatMulInteger {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "MatMulInteger";
        let [a, b] = required(OP, inputs, ["A", "B"])?;
        let (a, b) = (&a, &b);
        let azp = optional(inputs, 2);
        let bzp = optional(inputs, 3);
        let dims = MatDims::new(OP, a.shape(), b.shape())?;
        let out = ctx.output_slice::<i32>(0, &dims.out_shape)?;
        if dims.run_blas(ctx, OP, a, b, azp, bzp, out)? {
            return Ok(());
        }
        let a32 = shifted(OP, "a_zero_point", a, azp, true)?;
        let b32 = shifted(OP, "b_zero_point", b, bzp, false)?;
        dims.run(ctx, &a32, &b32, out)
    }
}

/// `a * b / y` rounded as numpy does in the scales' own type (f32, f16 or bf16).
pub(super) fn requant_multiplier(dtype: DType, a: f32, b: f32, y: f32) -> f32 {
    match dtype {
        DType::F16 => {
            let ab = f16::from_f32(a * b).to_f32();
            f16::from_f32(ab / y).to_f32()
        }
        DType::BF16 => {
            let ab = bf16::from_f32(a * b).to_f32();
            bf16::from_f32(ab / y).to_f32()
        }
        _ => a * b / y,
    }
}

/// A scale that is a scalar or a vector of `len` (per row of A / per column of B).
fn vector_scale(
    op: &str,
    name: &str,
    t: &TensorView<'_>,
    len: usize,
) -> Result<Vec<f32>, PluginError> {
    let v = read_f32(t, op)?.into_owned();
    if v.len() == 1 {
        // `len` is an extent of A or B, which may be empty.
        return try_vec(len, v[0]);
    }
    if t.rank() != 1 || v.len() != len {
        return Err(PluginError::unimplemented(format!(
            "{op}: {name} of shape {:?}: only a scalar or a vector of {len} is supported",
            t.shape()
        )));
    }
    Ok(v)
}

#[derive(Clone)]
pub(super) struct QLinearMatMul;

impl Kernel for QLinearMatMul {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "QLinearMatMul";
        if inputs.len() < 8 {
            return Err(PluginError::invalid(format!(
                "{OP}: expects 8 inputs, got {}",
                inputs.len()
            )));
        }
        let present = |i: usize| optional(inputs, i);
        let [a, a_scale] = required(OP, inputs, ["a", "a_scale"])?;
        let (b, b_scale) = (input(OP, inputs, 3, "b")?, input(OP, inputs, 4, "b_scale")?);
        let y_scale = input(OP, inputs, 6, "y_scale")?;
        let (a, b) = (&a, &b);
        let dims = MatDims::new(OP, a.shape(), b.shape())?;
        let sdtype = a_scale.dtype;
        let a_scale = vector_scale(OP, "a_scale", &a_scale, dims.m)?;
        let b_scale = vector_scale(OP, "b_scale", &b_scale, dims.n)?;
        let y_scale = read_f32(&y_scale, OP)?;
        if y_scale.len() != 1 {
            return Err(PluginError::invalid(format!(
                "{OP}: y_scale must be a scalar"
            )));
        }
        let (out_dtype, y_zp) = match present(7) {
            Some(z) => {
                let zv = read_i32(z, OP)?;
                if zv.len() != 1 {
                    return Err(PluginError::invalid(format!(
                        "{OP}: y_zero_point must be a scalar"
                    )));
                }
                (z.dtype, zv[0] as f64)
            }
            None => (a.dtype, 0.0),
        };
        // M x N and the output are unbounded by the operands when K = 0: fallible.
        let mn = numel(&[dims.m, dims.n])?;
        let mut mult: Vec<f32> = try_with_capacity(mn)?;
        mult.extend((0..mn).map(|ij| {
            requant_multiplier(
                sdtype,
                a_scale[ij / dims.n],
                b_scale[ij % dims.n],
                y_scale[0],
            )
        }));
        // The product goes through the BLAS as exact i32; the requantization stays here, not
        // in the BLAS epilogue, because the reference rounds `acc * (a*b/y)` with the
        // multiplier rounded in the scales' own type (f16/bf16 too), and conformance compares
        // bit for bit. Fused graphs (QDQ -> integer ops) use the BLAS epilogue instead.
        let mut c = try_vec(dims.len()?, 0i32)?;
        if !dims.run_blas(ctx, OP, a, b, present(2), present(5), &mut c)? {
            let a32 = shifted(OP, "a_zero_point", a, present(2), true)?;
            let b32 = shifted(OP, "b_zero_point", b, present(5), false)?;
            dims.run(ctx, &a32, &b32, &mut c)?;
        }
        fill_saturated(ctx, 0, out_dtype, &dims.out_shape, |i| {
            crate::util::round_even_narrow_f64(c[i] as f64 * mult[i % mn] as f64 + y_zp)
        })
    }
}

pub(super) fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("MatMulInteger", 10, OPEN_END)
            .constraint("T1", Q8)
            .constraint("T2", Q8)
            .constraint("T3", &[DType::I32])
            .inputs(&["T1", "T2", "T1", "T2"])
            .outputs(&["T3"]),
        stateless(MatMulInteger),
    );
    for (since, end, ts) in [(10, 20, &[DType::F32][..]), (21, OPEN_END, FLOATS)] {
        r.kernel(
            KernelDesc::onnx("QLinearMatMul", since, end)
                .constraint("T1", Q8)
                .constraint("T2", Q8)
                .constraint("T3", Q8)
                .constraint("TS", ts)
                .inputs(&["T1", "TS", "T1", "T2", "TS", "T2", "TS", "T3"])
                .outputs(&["T3"]),
            stateless(QLinearMatMul),
        );
    }
}
