//! `com.microsoft::QLinearAdd` (ONNX Runtime's contrib operator, which its QOperator-format
//! quantized models use): `C = Q(DQ(A) + DQ(B))` with per-tensor scales and zero points,
//! numpy broadcasting. The QDQ fusion `qdq-add` rewrites `DQ, DQ -> Add -> Q` into it (the
//! residual joins of a quantized ResNet): one pass over bytes instead of two dequantized f32
//! tensors, an f32 sum and a quantization.
//!
//! The arithmetic is ONNX Runtime's (the operator is its own): `a * sa / sc + b * sb / sc` with
//! the zero points folded into one constant, two fused multiply-adds, rounded half to even,
//! saturated (see [`crate::simd::qlinear_add`]). The unfused graph's steps (dequantize, add,
//! divide by `sc`) agree but for rare ties, one step apart, and cost a division per value.

use super::{read_f32, read_i32, Factory, GRAIN, Q8};
use crate::util::{broadcast_shapes, broadcast_strides, input, numel, optional, walk_offsets};
use opreg_sdk::prelude::*;

const OP: &str = "QLinearAdd";

/// `[scale, zero point]`: a scalar scale (f32) and the zero point (of the operand's type,
/// absent = 0) at `inputs[s]` and `inputs[s + 1]`.
fn params(inputs: &[TensorView<'_>], s: usize, of: DType) -> Result<[f32; 2], PluginError> {
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
    Ok([scale, zero])
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
        let out = ctx.output_to_overwrite(0, dtype, &shape)?.into_bytes()?;
        if a.shape() == b.shape() {
            return ctx.parallel_chunks(out, GRAIN, |start, chunk| {
                let (xs, ys) = (&ab[start..], &bb[start..]);
                crate::simd::qlinear_add(xs, ys, signed, pa, pb, pc, chunk);
            });
        }
        // Broadcast: a bounded run of outputs gathers its operands, then the same loop.
        const RUN: usize = 1024;
        let (sa, sb) = (
            broadcast_strides(a.shape(), &shape),
            broadcast_strides(b.shape(), &shape),
        );
        ctx.parallel_chunks(out, GRAIN, |start, chunk| {
            let (mut xs, mut ys) = ([0u8; RUN], [0u8; RUN]);
            for (r, run) in chunk.chunks_mut(RUN).enumerate() {
                let first = start + r * RUN;
                let mut k = 0;
                walk_offsets(&shape, &sa, first, run.len(), |o| {
                    if let (Some(d), Some(&v)) = (xs.get_mut(k), ab.get(o)) {
                        *d = v;
                    }
                    k += 1;
                });
                k = 0;
                walk_offsets(&shape, &sb, first, run.len(), |o| {
                    if let (Some(d), Some(&v)) = (ys.get_mut(k), bb.get(o)) {
                        *d = v;
                    }
                    k += 1;
                });
                crate::simd::qlinear_add(&xs, &ys, signed, pa, pb, pc, run);
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
