//! Quantization operators: `QuantizeLinear`, `DequantizeLinear`, `DynamicQuantizeLinear`,
//! `MatMulInteger`, `QLinearMatMul`, `ConvInteger`, `QLinearConv`.
//!
//! Quantized types: `uint8`, `int8`, `uint16`, `int16` (and `int32` for dequantization), the
//! 4- and 2-bit integers, float8 (E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ) and float4 (E2M1), the
//! low-bit ones held one element per byte (conversions in [`crate::lowbit`]); float6 is not.

use crate::lowbit;
use crate::util::{floats_as_f32, input, normalize_axis, optional, required, Factory};
use opreg_sdk::half::{bf16, f16};
use opreg_sdk::prelude::*;
use std::borrow::Cow;

mod add;
mod conv;
mod gemm;
mod matmul;
mod qgemm;

/// The float types of the quantized kernels: f64 is not in their ONNX schemas.
use opreg_sdk::numeric::FLOATS_TO_F32 as FLOATS;
const Q8: &[DType] = &[DType::U8, DType::I8];
const Q16: &[DType] = &[DType::U8, DType::I8, DType::U16, DType::I16];
/// The float8 types (QuantizeLinear / DequantizeLinear 19+).
const F8: &[DType] = &[
    DType::F8E4M3FN,
    DType::F8E4M3FNUZ,
    DType::F8E5M2,
    DType::F8E5M2FNUZ,
];

/// The quantized types of QuantizeLinear / DequantizeLinear `since` (without `int32`).
fn quant_types(since: i32) -> Vec<DType> {
    let mut t = Q8.to_vec();
    if since >= 19 {
        t.extend_from_slice(F8);
    }
    if since >= 21 {
        t.extend_from_slice(&[DType::U16, DType::I16, DType::U4, DType::I4]);
    }
    if since >= 23 {
        t.push(DType::F4E2M1);
    }
    if since >= 25 {
        t.extend_from_slice(&[DType::U2, DType::I2]);
    }
    t
}

/// The values of a float8 / float4 tensor as `f32`; `None` for other types.
fn read_lowbit_float(t: &TensorView<'_>) -> Result<Option<Vec<f32>>, PluginError> {
    if !lowbit::is_lowbit_float(t.dtype) || t.dtype == DType::F8E8M0 {
        return Ok(None);
    }
    let d = t.dtype;
    Ok(Some(
        t.as_bytes()?
            .iter()
            .map(|&c| lowbit::decode(d, c))
            .collect(),
    ))
}

/// Elements per parallel chunk for elementwise loops.
const GRAIN: usize = 8192;

/// The elements of a float (or `int32`) tensor as `f32`.
pub(crate) fn read_f32<'a>(t: &TensorView<'a>, what: &str) -> Result<Cow<'a, [f32]>, PluginError> {
    if t.dtype == DType::I32 {
        return Ok(Cow::Owned(
            t.as_slice::<i32>()?.iter().map(|&v| v as f32).collect(),
        ));
    }
    floats_as_f32(t).unwrap_or_else(|| {
        Err(PluginError::unimplemented(format!(
            "{what}: element type {} is not supported",
            t.dtype
        )))
    })
}

/// The elements of a small-integer tensor (`u8`, `i8`, `u16`, `i16`, `i32`, and the 4- and
/// 2-bit integers) as `i32`.
pub(crate) fn read_i32(t: &TensorView<'_>, what: &str) -> Result<Vec<i32>, PluginError> {
    Ok(match t.dtype {
        d if lowbit::is_lowbit_int(d) => t
            .as_bytes()?
            .iter()
            .map(|&c| lowbit::decode_int(d, c).unwrap_or(0))
            .collect(),
        DType::U8 => t.as_slice::<u8>()?.iter().map(|&v| v as i32).collect(),
        DType::I8 => t.as_slice::<i8>()?.iter().map(|&v| v as i32).collect(),
        DType::U16 => t.as_slice::<u16>()?.iter().map(|&v| v as i32).collect(),
        DType::I16 => t.as_slice::<i16>()?.iter().map(|&v| v as i32).collect(),
        DType::I32 => t.as_slice::<i32>()?.to_vec(),
        other => {
            return Err(PluginError::unimplemented(format!(
                "{what}: element type {other} is not supported"
            )))
        }
    })
}

/// Allocates output `index` as `T` and fills element `i` with `f(i)`, in parallel.
pub(crate) fn fill<T: Element, F>(
    ctx: &KernelContext<'_>,
    index: usize,
    shape: &[usize],
    f: F,
) -> Result<(), PluginError>
where
    F: Fn(usize) -> T + Sync,
{
    let y = ctx.output_slice_to_overwrite::<T>(index, shape)?;
    ctx.parallel_chunks(y, GRAIN, |start, chunk| {
        for (j, o) in chunk.iter_mut().enumerate() {
            *o = f(start + j);
        }
    })
}

/// Allocates float output `index` of `dtype` (f32, f16, bf16, f64) from `f32` values.
pub(crate) fn fill_float<F>(
    ctx: &KernelContext<'_>,
    index: usize,
    dtype: DType,
    shape: &[usize],
    f: F,
) -> Result<(), PluginError>
where
    F: Fn(usize) -> f32 + Sync,
{
    match dtype {
        DType::F32 => fill::<f32, _>(ctx, index, shape, f),
        DType::F16 => fill::<f16, _>(ctx, index, shape, |i| f16::from_f32(f(i))),
        DType::BF16 => fill::<bf16, _>(ctx, index, shape, |i| bf16::from_f32(f(i))),
        DType::F64 => fill::<f64, _>(ctx, index, shape, |i| f(i) as f64),
        other => Err(PluginError::unimplemented(format!(
            "float output of type {other} is not supported"
        ))),
    }
}

/// Allocates quantized output `index` of `dtype` (u8, i8, u16, i16, and the 4- and 2-bit
/// integers) from already rounded values, saturating them to the type's range (NaN becomes
/// 0).
fn fill_saturated<F>(
    ctx: &KernelContext<'_>,
    index: usize,
    dtype: DType,
    shape: &[usize],
    f: F,
) -> Result<(), PluginError>
where
    F: Fn(usize) -> f64 + Sync,
{
    // `as` from f64 saturates to the target range and maps NaN to 0.
    match dtype {
        DType::U8 => fill::<u8, _>(ctx, index, shape, |i| f(i) as u8),
        DType::I8 => fill::<i8, _>(ctx, index, shape, |i| f(i) as i8),
        DType::U16 => fill::<u16, _>(ctx, index, shape, |i| f(i) as u16),
        DType::I16 => fill::<i16, _>(ctx, index, shape, |i| f(i) as i16),
        d if lowbit::is_lowbit_int(d) => fill_codes(ctx, index, d, shape, |i| {
            lowbit::saturate_int(d, f(i) as i64)
        }),
        other => Err(PluginError::unimplemented(format!(
            "quantized type {other} is not supported"
        ))),
    }
}

/// QuantizeLinear's common case, f32 to u8/i8 with one scale: a straight loop the compiler
/// vectorizes. The same results as the general path: `x / s` rounded half to even in f32, the
/// zero point added (exact in f32 for every value that does not saturate anyway), saturated by
/// the cast (NaN to 0).
fn quantize_per_tensor(
    ctx: &KernelContext<'_>,
    x: &[f32],
    shape: &[usize],
    s: f32,
    z: f32,
    dtype: DType,
) -> Result<(), PluginError> {
    let y = ctx.output_to_overwrite(0, dtype, shape)?.into_bytes()?;
    ctx.parallel_chunks(y, GRAIN, |start, out| {
        let xs = x.get(start..).unwrap_or_default();
        let (lo, hi) = if dtype == DType::U8 {
            (0.0, 255.0)
        } else {
            (-128.0, 127.0)
        };
        // QuantizeLinear rounds the f32 quotient, then adds the zero point: adding first
        // would move ties (25.5 + 153 rounds to 178, round(25.5) + 153 is 179).
        crate::simd::quantize(xs, s, f64::from(z), lo, hi, out);
    })
}

/// DequantizeLinear's common case, u8/i8 to f32 with one scale: `(x - z) * s` in one
/// vectorized pass (the general path widens `x` to i32 first).
fn dequantize_per_tensor<T: Element + crate::simd::Dequantize>(
    ctx: &KernelContext<'_>,
    x: &[T],
    shape: &[usize],
    s: f32,
    z: f32,
) -> Result<(), PluginError> {
    let y = ctx.output_slice_to_overwrite::<f32>(0, shape)?;
    ctx.parallel_chunks(y, GRAIN, |start, out| {
        T::dequantize(x.get(start..).unwrap_or_default(), s, z, out);
    })
}

/// Allocates low-bit output `index` of `dtype` (one byte per element) and fills element `i`
/// with the code `f(i)`, in parallel.
fn fill_codes<F>(
    ctx: &KernelContext<'_>,
    index: usize,
    dtype: DType,
    shape: &[usize],
    f: F,
) -> Result<(), PluginError>
where
    F: Fn(usize) -> u8 + Sync,
{
    let y = ctx.output_to_overwrite(index, dtype, shape)?.into_bytes()?;
    ctx.parallel_chunks(y, GRAIN, |start, chunk| {
        for (j, o) in chunk.iter_mut().enumerate() {
            *o = f(start + j);
        }
    })
}

/// How scale / zero point elements map onto the elements of `x`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Granularity {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per index of the axis: `x` seen as `[pre, d, post]`.
    Axis { d: usize, post: usize },
    /// One scale per block of `b` along the axis: scales seen as `[pre, nb, post]`.
    Block {
        d: usize,
        post: usize,
        b: usize,
        nb: usize,
    },
}

impl Granularity {
    /// Which scale element applies to the element at linear index `i` of `x`.
    fn index(&self, i: usize) -> usize {
        match *self {
            Granularity::Tensor => 0,
            Granularity::Axis { d, post } => (i / post) % d,
            Granularity::Block { d, post, b, nb } => {
                let q = i % post;
                let dd = (i / post) % d;
                let p = i / (post * d);
                (p * nb + dd / b) * post + q
            }
        }
    }

    /// Works out the granularity from the shapes of `x` and its scale (ONNX QuantizeLinear-21).
    fn of(
        op: &str,
        x: &[usize],
        scale: &[usize],
        axis: i64,
        block_size: i64,
    ) -> Result<Self, PluginError> {
        // Saturating products: shapes of possibly empty tensors.
        if crate::util::product_sat(scale) == 1 {
            return Ok(Granularity::Tensor);
        }
        if block_size < 0 {
            return Err(PluginError::invalid(format!(
                "{op}: attribute 'block_size' must be >= 0, got {block_size}"
            )));
        }
        let axis = normalize_axis(axis, x.len())
            .map_err(|e| PluginError::invalid(format!("{op}: attribute 'axis': {}", e.message)))?;
        let d = x[axis];
        let post = crate::util::product_sat(&x[axis + 1..]);
        if block_size == 0 {
            if scale.len() != 1 || scale[0] != d {
                return Err(PluginError::invalid(format!(
                    "{op}: scale of shape {scale:?} is neither a scalar nor a 1-D tensor of \
                     length {d} (x shape {x:?}, axis {axis})"
                )));
            }
            return Ok(Granularity::Axis {
                d,
                post: post.max(1),
            });
        }
        let b = block_size as usize;
        let nb = d.div_ceil(b);
        let ok = scale.len() == x.len()
            && scale
                .iter()
                .zip(x)
                .enumerate()
                .all(|(j, (&s, &xd))| if j == axis { s == nb } else { s == xd });
        if !ok {
            return Err(PluginError::invalid(format!(
                "{op}: for blocked quantization the scale of shape {scale:?} must match x shape \
                 {x:?} except along axis {axis}, where it must be ceil({d}/{b}) = {nb}"
            )));
        }
        Ok(Granularity::Block {
            d,
            post: post.max(1),
            b,
            nb,
        })
    }
}

fn check_zero_point_shape(
    op: &str,
    scale: &TensorView<'_>,
    zp: &TensorView<'_>,
) -> Result<(), PluginError> {
    if scale.shape() != zp.shape() && !(scale.len() == 1 && zp.len() == 1) {
        return Err(PluginError::invalid(format!(
            "{op}: zero point shape {:?} differs from scale shape {:?}",
            zp.shape(),
            scale.shape()
        )));
    }
    Ok(())
}

fn output_dtype_attr(node: &NodeInfo<'_>) -> Result<Option<DType>, PluginError> {
    let code = node.int_or("output_dtype", 0)?;
    if code == 0 {
        return Ok(None);
    }
    DType::from_onnx_code(code as i32).map(Some).ok_or_else(|| {
        PluginError::unimplemented(format!(
            "{}: attribute 'output_dtype' = {code} is a type opreg does not support",
            node.op_type
        ))
    })
}

#[derive(Clone)]
struct Quantize {
    axis: i64,
    block_size: i64,
    output_dtype: Option<DType>,
    /// `saturate` (float8 outputs).
    saturate: bool,
}

impl Kernel for Quantize {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "QuantizeLinear";
        let [x, scale] = required(OP, inputs, ["x", "y_scale"])?;
        let (x, scale) = (&x, &scale);
        let zp = optional(inputs, 2);
        let out_dtype = match (zp, self.output_dtype) {
            (Some(z), Some(o)) if z.dtype != o => {
                return Err(PluginError::invalid(format!(
                    "{OP}: y_zero_point is {} but attribute 'output_dtype' says {o}",
                    z.dtype
                )))
            }
            (Some(z), _) => z.dtype,
            (None, Some(o)) => o,
            (None, None) => DType::U8,
        };
        let float_out = F8.contains(&out_dtype) || out_dtype == DType::F4E2M1;
        if !Q16.contains(&out_dtype) && !lowbit::is_lowbit_int(out_dtype) && !float_out {
            return Err(PluginError::unimplemented(format!(
                "{OP}: output type {out_dtype} is not supported (uint8, int8, uint16, int16, \
                 uint4, int4, uint2, int2, float8, float4e2m1)"
            )));
        }
        let g = Granularity::of(OP, x.shape(), scale.shape(), self.axis, self.block_size)?;
        let scales = read_f32(scale, "QuantizeLinear y_scale")?;
        if float_out {
            return self.quantize_float(ctx, (x, scale), &scales, zp, g, out_dtype);
        }
        let zps = match zp {
            Some(z) => {
                check_zero_point_shape(OP, scale, z)?;
                Some(read_i32(z, "QuantizeLinear y_zero_point")?)
            }
            None => None,
        };
        let zp_at = |j: usize| zps.as_ref().map_or(0.0, |z| z[j] as f64);
        if g == Granularity::Tensor && x.dtype == DType::F32 {
            let (s, z) = (scales.first().copied(), zp_at(0) as f32);
            if let (Some(s), DType::U8 | DType::I8) = (s, out_dtype) {
                return quantize_per_tensor(ctx, x.as_slice::<f32>()?, x.shape(), s, z, out_dtype);
            }
        }
        match x.dtype {
            DType::I32 => {
                let xs = x.as_slice::<i32>()?;
                fill_saturated(ctx, 0, out_dtype, x.shape(), |i| {
                    let j = g.index(i);
                    (xs[i] as f64 / scales[j] as f64).round_ties_even() + zp_at(j)
                })
            }
            _ => {
                let xs = read_f32(x, "QuantizeLinear x")?;
                fill_saturated(ctx, 0, out_dtype, x.shape(), |i| {
                    let j = g.index(i);
                    (xs[i] / scales[j]).round_ties_even() as f64 + zp_at(j)
                })
            }
        }
    }
}

impl Quantize {
    /// Float8 / float4 output: `x / y_scale (+ y_zero_point)`, rounded to nearest even, with
    /// `saturate` (float4 always saturates). As the reference, a float8 zero point (which must
    /// be 0) is only added when non-zero, so -0 stays -0; a float4 one is always added.
    fn quantize_float(
        &self,
        ctx: &KernelContext<'_>,
        (x, scale): (&TensorView<'_>, &TensorView<'_>),
        scales: &[f32],
        zp: Option<&TensorView<'_>>,
        g: Granularity,
        out: DType,
    ) -> Result<(), PluginError> {
        const OP: &str = "QuantizeLinear";
        let zps = match zp {
            Some(z) => {
                check_zero_point_shape(OP, scale, z)?;
                read_lowbit_float(z)?
            }
            None => None,
        };
        let always_add = out == DType::F4E2M1;
        let xs: Cow<'_, [f32]> = match x.dtype {
            DType::I32 => Cow::Owned(x.as_slice::<i32>()?.iter().map(|&v| v as f32).collect()),
            _ => read_f32(x, "QuantizeLinear x")?,
        };
        let sat = self.saturate;
        fill_codes(ctx, 0, out, x.shape(), |i| {
            let j = g.index(i);
            let mut v = xs[i] / scales[j];
            if let Some(z) = &zps {
                if always_add || z[j] != 0.0 {
                    v += z[j];
                }
            }
            lowbit::encode_float(out, v, sat)
        })
    }
}

#[derive(Clone)]
struct Dequantize {
    axis: i64,
    block_size: i64,
    output_dtype: Option<DType>,
}

impl Kernel for Dequantize {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "DequantizeLinear";
        let [x, scale] = required(OP, inputs, ["x", "x_scale"])?;
        let (x, scale) = (&x, &scale);
        let zp = optional(inputs, 2);
        let out_dtype = self.output_dtype.unwrap_or(scale.dtype);
        if !FLOATS.contains(&out_dtype) {
            return Err(PluginError::invalid(format!(
                "{OP}: output type {out_dtype} must be float, float16 or bfloat16"
            )));
        }
        let g = Granularity::of(OP, x.shape(), scale.shape(), self.axis, self.block_size)?;
        let scales = read_f32(scale, "DequantizeLinear x_scale")?;
        if let Some(xf) = read_lowbit_float(x)? {
            // Float8 / float4: `(x - x_zero_point) * x_scale`, the zero point decoded too.
            let zps = match zp {
                Some(z) => {
                    if z.dtype != x.dtype {
                        return Err(PluginError::invalid(format!(
                            "{OP}: x_zero_point is {} but x is {}",
                            z.dtype, x.dtype
                        )));
                    }
                    check_zero_point_shape(OP, scale, z)?;
                    read_lowbit_float(z)?
                }
                None => None,
            };
            return fill_float(ctx, 0, out_dtype, x.shape(), |i| {
                let j = g.index(i);
                let z = zps.as_ref().map_or(0.0, |z| z[j]);
                (xf[i] - z) * scales[j]
            });
        }
        let zps = match zp {
            Some(z) => {
                if z.dtype != x.dtype {
                    return Err(PluginError::invalid(format!(
                        "{OP}: x_zero_point is {} but x is {}",
                        z.dtype, x.dtype
                    )));
                }
                check_zero_point_shape(OP, scale, z)?;
                Some(read_i32(z, "DequantizeLinear x_zero_point")?)
            }
            None => None,
        };
        if g == Granularity::Tensor && out_dtype == DType::F32 {
            let z = zps
                .as_ref()
                .and_then(|z| z.first())
                .map_or(0.0, |&z| z as f32);
            if let Some(&s) = scales.first() {
                match x.dtype {
                    DType::U8 => {
                        return dequantize_per_tensor(ctx, x.as_slice::<u8>()?, x.shape(), s, z)
                    }
                    DType::I8 => {
                        return dequantize_per_tensor(ctx, x.as_slice::<i8>()?, x.shape(), s, z)
                    }
                    _ => {}
                }
            }
        }
        let xs = read_i32(x, "DequantizeLinear x")?;
        fill_float(ctx, 0, out_dtype, x.shape(), |i| {
            let j = g.index(i);
            let z = zps.as_ref().map_or(0.0, |z| z[j] as f32);
            (xs[i] as f32 - z) * scales[j]
        })
    }
}

#[derive(Clone)]
struct DynamicQuantize;

impl Kernel for DynamicQuantize {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input("DynamicQuantizeLinear", inputs, 0, "x")?;
        let x = xv.as_slice::<f32>()?;
        let (qmin, qmax) = (0.0f32, 255.0f32);
        // The range always includes 0, so that 0 is exactly representable.
        let maxx = x.iter().copied().fold(0.0f32, f32::max);
        let minx = x.iter().copied().fold(0.0f32, f32::min);
        let scale = if maxx == minx { 1.0 } else { maxx - minx } / (qmax - qmin);
        let zp = (qmin - minx / scale).clamp(qmin, qmax).round_ties_even();
        fill::<u8, _>(ctx, 0, xv.shape(), |i| {
            (crate::util::round_even_narrow_f32(x[i] / scale) + zp).clamp(qmin, qmax) as u8
        })?;
        ctx.output_slice::<f32>(1, &[])?[0] = scale;
        ctx.output_slice::<u8>(2, &[])?[0] = zp as u8;
        Ok(())
    }
}

/// Registers `factory` under each opset range, with the constraints `desc` gives for it.
fn ranges<F>(r: &mut Registrar, ranges: &[(i32, i32)], desc: impl Fn(i32, i32) -> KernelDesc, f: F)
where
    F: KernelFactory + Clone,
{
    for &(since, end) in ranges {
        r.kernel(desc(since, end), f.clone());
    }
}

fn quantize_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Quantize {
        axis: node.int_or("axis", 1)?,
        block_size: node.int_or("block_size", 0)?,
        output_dtype: output_dtype_attr(node)?,
        saturate: node.int_or("saturate", 1)? != 0,
    }))
}

fn dequantize_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Dequantize {
        axis: node.int_or("axis", 1)?,
        block_size: node.int_or("block_size", 0)?,
        output_dtype: output_dtype_attr(node)?,
    }))
}

pub fn register(r: &mut Registrar) {
    // QuantizeLinear: one registration per schema version.
    let q_ranges = [
        (10, 12),
        (13, 18),
        (19, 20),
        (21, 22),
        (23, 23),
        (24, 24),
        (25, 27),
        (28, OPEN_END),
    ];
    ranges(
        r,
        &q_ranges,
        |since, end| {
            let d = KernelDesc::onnx("QuantizeLinear", since, end);
            let q = quant_types(since);
            let (t1, t2): (&[DType], &[DType]) = match since {
                ..=18 => (&[DType::F32, DType::I32], &q),
                _ => (&[DType::F32, DType::F16, DType::BF16, DType::I32], &q),
            };
            if since >= 23 {
                d.constraint("T1", t1)
                    .constraint("T2", t1)
                    .constraint("T3", t2)
                    .inputs(&["T1", "T2", "T3"])
                    .outputs(&["T3"])
            } else {
                d.constraint("T1", t1)
                    .constraint("T2", t2)
                    .constraint("TS", if since >= 19 { t1 } else { &[DType::F32] })
                    .inputs(&["T1", "TS", "T2"])
                    .outputs(&["T2"])
            }
        },
        quantize_factory as Factory,
    );

    ranges(
        r,
        &q_ranges,
        |since, end| {
            let d = KernelDesc::onnx("DequantizeLinear", since, end);
            let mut q = quant_types(since);
            q.push(DType::I32);
            let t1: &[DType] = &q;
            let ts: &[DType] = if since >= 19 { FLOATS } else { &[DType::F32] };
            let d = d
                .constraint("T1", t1)
                .constraint("T2", ts)
                .inputs(&["T1", "T2", "T1"]);
            if since >= 23 {
                d.constraint("T3", FLOATS).outputs(&["T3"])
            } else {
                d.outputs(&["T2"])
            }
        },
        dequantize_factory as Factory,
    );

    r.kernel(
        KernelDesc::onnx("DynamicQuantizeLinear", 11, OPEN_END)
            .constraint("T1", &[DType::F32])
            .constraint("T2", &[DType::U8])
            .inputs(&["T1"])
            .outputs(&["T2", "T1", "T2"]),
        stateless(DynamicQuantize),
    );

    matmul::register(r);
    conv::register(r);
    add::register(r);
    qgemm::register(r);
}

#[cfg(test)]
mod tests;
