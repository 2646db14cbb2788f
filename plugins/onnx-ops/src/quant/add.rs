//! `com.microsoft::QLinearAdd` (ONNX Runtime's contrib operator, which its QOperator-format
//! quantized models use): `C = Q(DQ(A) + DQ(B))` with per-tensor scales and zero points,
//! numpy broadcasting. The QDQ fusion `qdq-add` rewrites `DQ, DQ -> Add -> Q` into it (the
//! residual joins of a quantized ResNet): one pass over bytes instead of two dequantized f32
//! tensors, an f32 sum and a quantization.
//!
//! The arithmetic is the unfused graph's, step for step in f32 — `(a - za) * sa`,
//! `(b - zb) * sb`, their sum, the quotient by `sc` rounded half to even, `zc` added, saturated —
//! so the fusion changes no result. (ONNX Runtime's kernel multiplies by the ratios `sa / sc`
//! and `sb / sc` instead, which can differ by one step on rare ties.)

use super::{read_f32, read_i32, Factory, GRAIN, Q8};
use crate::util::{broadcast_shapes, broadcast_strides, input, numel, optional, walk_offsets};
use opreg_sdk::prelude::*;

const OP: &str = "QLinearAdd";

/// One operand's per-tensor parameters: scale and zero point.
#[derive(Clone, Copy)]
struct Params {
    scale: f32,
    zero: f32,
}

/// A scalar scale (f32) and the zero point (of the operand's type, absent = 0) at `inputs[s]`
/// and `inputs[s + 1]`.
fn params(inputs: &[TensorView<'_>], s: usize, of: DType) -> Result<Params, PluginError> {
    let scale = read_f32(&input(OP, inputs, s, "scale")?, OP)?;
    let [scale] = scale[..] else {
        return Err(PluginError::unimplemented(format!(
            "{OP}: input {s}: only a per-tensor (scalar) scale is supported"
        )));
    };
    let zero = match optional(inputs, s + 1) {
        Some(z) => {
            if z.dtype != of {
                return Err(PluginError::invalid(format!(
                    "{OP}: input {}: zero point is {} but its tensor is {of}",
                    s + 1,
                    z.dtype
                )));
            }
            match read_i32(z, OP)?[..] {
                [z] => z as f32,
                _ => {
                    return Err(PluginError::unimplemented(format!(
                        "{OP}: input {}: only a per-tensor (scalar) zero point is supported",
                        s + 1
                    )))
                }
            }
        }
        None => 0.0,
    };
    Ok(Params { scale, zero })
}

#[derive(Clone)]
struct QLinearAdd;

impl Kernel for QLinearAdd {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let (a, b) = (input(OP, inputs, 0, "A")?, input(OP, inputs, 3, "B")?);
        if a.dtype != b.dtype || !Q8.contains(&a.dtype) {
            return Err(PluginError::invalid(format!(
                "{OP}: A and B must both be u8 or both i8, got {} and {}",
                a.dtype, b.dtype
            )));
        }
        let dtype = a.dtype;
        let (pa, pb, pc) = (
            params(inputs, 1, dtype)?,
            params(inputs, 4, dtype)?,
            params(inputs, 6, dtype)?,
        );
        let shape = broadcast_shapes(&[a.shape(), b.shape()])?;
        numel(&shape)?;
        let (ab, bb) = (super::gemm::bytes(&a, OP)?, super::gemm::bytes(&b, OP)?);
        let signed = dtype == DType::I8;
        // Bytes as the type's values (an i8 byte read as two's complement).
        let value = move |v: u8| -> f32 {
            if signed {
                f32::from(v as i8)
            } else {
                f32::from(v)
            }
        };
        let (lo, hi) = if signed {
            (-128.0, 127.0)
        } else {
            (0.0, 255.0)
        };
        let one = move |x: u8, y: u8| -> u8 {
            let sum = (value(x) - pa.zero) * pa.scale + (value(y) - pb.zero) * pb.scale;
            let q = f64::from(crate::util::round_even_narrow_f32(sum / pc.scale));
            crate::util::round_saturate_byte(q + f64::from(pc.zero), lo, hi)
        };
        let out = ctx.output(0, dtype, &shape)?.into_bytes()?;
        if a.shape() == b.shape() {
            let (a, b, c) = (
                [pa.scale, pa.zero],
                [pb.scale, pb.zero],
                [pc.scale, pc.zero],
            );
            return ctx.parallel_chunks(out, GRAIN, |start, chunk| {
                let (xs, ys) = (&ab[start..], &bb[start..]);
                crate::util::qlinear_add(xs, ys, signed, a, b, c, chunk);
            });
        }
        let (sa, sb) = (
            broadcast_strides(a.shape(), &shape),
            broadcast_strides(b.shape(), &shape),
        );
        // Broadcast: A's offsets for a bounded run of outputs, then B's walked alongside.
        const RUN: usize = 4096;
        ctx.parallel_chunks(out, GRAIN, |start, chunk| {
            let mut xo = Vec::with_capacity(RUN);
            for (r, run) in chunk.chunks_mut(RUN).enumerate() {
                let first = start + r * RUN;
                xo.clear();
                walk_offsets(&shape, &sa, first, run.len(), |o| xo.push(o));
                let mut k = 0;
                walk_offsets(&shape, &sb, first, run.len(), |o| {
                    if let (Some(d), Some(&x), Some(&y)) = (
                        run.get_mut(k),
                        xo.get(k).and_then(|&i| ab.get(i)),
                        bb.get(o),
                    ) {
                        *d = one(x, y);
                    }
                    k += 1;
                });
            }
        })
    }
}

pub(super) fn qlinear_add_factory(_: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(QLinearAdd))
}

pub(super) fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::new("com.microsoft", OP, 1, OPEN_END)
            .constraint("T", Q8)
            .constraint("TS", &[DType::F32])
            .inputs(&["T", "TS", "T", "T", "TS", "T", "TS", "T"])
            .outputs(&["T"]),
        qlinear_add_factory as Factory,
    );
}
