//! `Cast` and `CastLike` between every numeric type and bool (strings are not supported),
//! including the 8-, 4- and 2-bit types (held one element per byte; see [`crate::lowbit`]).

use super::engine::map;
use crate::lowbit::{self, RoundMode};
use crate::util::input;
use opreg_sdk::half::{bf16, f16, slice::HalfFloatSliceExt};
use opreg_sdk::numeric::{convert, Scalar};
use opreg_sdk::prelude::*;

/// Every type `Cast` converts between: every dtype but strings.
pub const CAST_TYPES: &[DType] = &{
    let mut out = [DType::Bool; DType::ALL.len() - 1];
    let (mut i, mut j) = (0, 0);
    while i < DType::ALL.len() {
        if !matches!(DType::ALL[i], DType::String) {
            out[j] = DType::ALL[i];
            j += 1;
        }
        i += 1;
    }
    out
};

/// Elements per parallel chunk.
const GRAIN: usize = 8192;

/// `Cast` to a fixed type (`to`), or `CastLike` (`to: None`: the type of input 1).
#[derive(Clone)]
pub struct Cast {
    to: Option<DType>,
    /// `saturate` (float8 targets; default 1).
    saturate: bool,
    /// `round_mode` (float8e8m0 targets; default `up`).
    round_mode: RoundMode,
}

impl Cast {
    /// Reads `saturate` and `round_mode`.
    fn with_attrs(op: &str, node: &NodeInfo<'_>, to: Option<DType>) -> Result<Self, PluginError> {
        let saturate = node.int_or("saturate", 1)? != 0;
        let mode = node.string_or("round_mode", "up")?;
        let round_mode = RoundMode::parse(&mode).ok_or_else(|| {
            PluginError::invalid(format!(
                "{op}: attribute 'round_mode' must be 'up', 'down' or 'nearest', got '{mode}'"
            ))
        })?;
        Ok(Cast {
            to,
            saturate,
            round_mode,
        })
    }

    /// Reads `to` (and `saturate`, `round_mode`) for `Cast`.
    pub fn from_node(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        let code = node
            .attr("to")
            .ok_or_else(|| PluginError::invalid("Cast: attribute 'to' is required"))?;
        let AttrValue::Int(code) = *code else {
            return Err(PluginError::invalid(format!(
                "Cast: attribute 'to' must be INT, got {code:?}"
            )));
        };
        let to = i32::try_from(code)
            .ok()
            .and_then(DType::from_onnx_code)
            .ok_or_else(|| {
                PluginError::unimplemented(format!(
                    "Cast: attribute 'to' = {code} is not supported"
                ))
            })?;
        if to == DType::String {
            return Err(PluginError::unimplemented(
                "Cast: to STRING is not supported",
            ));
        }
        Ok(Box::new(Cast::with_attrs("Cast", node, Some(to))?))
    }

    /// `CastLike`: the target type is input 1's.
    pub fn like_from_node(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        Ok(Box::new(Cast::with_attrs("CastLike", node, None)?))
    }
}

impl Kernel for Cast {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let op = if self.to.is_some() {
            "Cast"
        } else {
            "CastLike"
        };
        let x = &input(op, inputs, 0, "input")?;
        let to = match self.to {
            Some(to) => to,
            None => match inputs.get(1) {
                Some(t) if !t.is_absent() => t.dtype,
                _ => {
                    return Err(PluginError::invalid(
                        "CastLike: input 'target_type' is missing",
                    ))
                }
            },
        };
        // f32 <-> f16 a slice at a time, with the CPU's conversion instructions (F16C) where
        // it has them: element by element through f64 and `half`'s software rounding it took
        // 14x ONNX Runtime's time. The same values: an f32 widens to f64 exactly, so both
        // round it to f16 once, to nearest even.
        match (x.dtype, to) {
            (DType::F32, DType::F16) => {
                let xs = x.as_slice::<f32>()?;
                let y = ctx.output_slice_to_overwrite::<f16>(0, x.shape())?;
                return ctx.parallel_chunks(y, GRAIN, |start, out| {
                    out.convert_from_f32_slice(&xs[start..start + out.len()]);
                });
            }
            (DType::F16, DType::F32) => {
                let xs = x.as_slice::<f16>()?;
                let y = ctx.output_slice_to_overwrite::<f32>(0, x.shape())?;
                return ctx.parallel_chunks(y, GRAIN, |start, out| {
                    xs[start..start + out.len()].convert_to_f32_slice(out);
                });
            }
            // The Casts around `lowered=bf16` layers: the element path took a quarter of a
            // bf16 BERT's time (1.3 ns per element).
            (DType::F32, DType::BF16) => {
                let xs = x.as_slice::<f32>()?;
                let y = ctx.output_slice_to_overwrite::<bf16>(0, x.shape())?;
                return ctx.parallel_chunks(y, GRAIN, |start, out| {
                    f32_to_bf16(&xs[start..start + out.len()], out)
                });
            }
            (DType::BF16, DType::F32) => {
                let xs = x.as_slice::<bf16>()?;
                let y = ctx.output_slice_to_overwrite::<f32>(0, x.shape())?;
                return ctx.parallel_chunks(y, GRAIN, |start, out| {
                    bf16_to_f32(&xs[start..start + out.len()], out)
                });
            }
            _ => {}
        }
        if lowbit::is_lowbit(x.dtype) {
            let xs = x.as_bytes()?;
            let from = x.dtype;
            if lowbit::is_lowbit_int(from) {
                let get = |i: usize| Wide::Int(lowbit::decode_int(from, xs[i]).unwrap_or(0).into());
                self.cast_to(ctx, x.shape(), to, get)
            } else {
                let get = |i: usize| Wide::Float(f64::from(lowbit::decode(from, xs[i])));
                self.cast_to(ctx, x.shape(), to, get)
            }
        } else if lowbit::is_lowbit(to) {
            opreg_sdk::dispatch!(x.dtype, ALL, |S| {
                let xs = x.as_slice::<S>()?;
                self.cast_to(ctx, x.shape(), to, |i| Wide::of(xs[i]))
            }, other => Err(super::unsupported("Cast (input)", other)))
        } else {
            opreg_sdk::dispatch!(x.dtype, ALL, |S| {
                opreg_sdk::dispatch!(to, ALL, |D| map(ctx, x, convert::<S, D>), other => Err(super::unsupported("Cast (target)", other)))
            }, other => Err(super::unsupported("Cast (input)", other)))
        }
    }
}

crate::simd::simd_fn! {
    /// f32 -> bf16 rounded to nearest even on the bits, a NaN kept as a quiet NaN (the values
    /// of `half`'s `bf16::from_f32`, and of the element path through f64: an f32 widens
    /// exactly), branch-free so that the loop vectorizes.
    fn f32_to_bf16(xs: &[f32], out: &mut [bf16]) {
        for (o, &x) in out.iter_mut().zip(xs) {
            let b = x.to_bits();
            let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
            let quiet_nan = (b >> 16) as u16 | 0x40;
            *o = bf16::from_bits(if x.is_nan() { quiet_nan } else { rounded });
        }
    }
}

crate::simd::simd_fn! {
    /// bf16 -> f32: exact, the bits moved up.
    fn bf16_to_f32(xs: &[bf16], out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = f32::from_bits(u32::from(x.to_bits()) << 16);
        }
    }
}

/// One source element, widened without loss (floats as their value, integers and bool as
/// integers), as [`convert`] sees it.
#[derive(Clone, Copy)]
enum Wide {
    Int(i128),
    Float(f64),
}

impl Wide {
    fn of<S: Scalar>(v: S) -> Self {
        if S::IS_FLOAT {
            Wide::Float(v.to_f64())
        } else {
            Wide::Int(v.to_i128())
        }
    }
}

impl Cast {
    /// Writes output 0 of type `to` and `shape`, element `i` converted from `get(i)`; at least
    /// one of the source and `to` is a low-bit type.
    fn cast_to<G>(
        &self,
        ctx: &KernelContext<'_>,
        shape: &[usize],
        to: DType,
        get: G,
    ) -> Result<(), PluginError>
    where
        G: Fn(usize) -> Wide + Sync,
    {
        if lowbit::is_lowbit(to) {
            let (sat, mode) = (self.saturate, self.round_mode);
            let y = ctx.output(0, to, shape)?.into_bytes()?;
            return ctx.parallel_chunks(y, GRAIN, |start, out| {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = match get(start + j) {
                        Wide::Int(v) if lowbit::is_lowbit_int(to) => lowbit::wrap_int(to, v),
                        Wide::Float(v) if lowbit::is_lowbit_int(to) => lowbit::float_to_int(to, v),
                        // ml_dtypes casts wider floats through f32, and so do we.
                        Wide::Int(v) => lowbit::encode(to, v as f32, sat, mode),
                        Wide::Float(v) => lowbit::encode(to, v as f32, sat, mode),
                    };
                }
            });
        }
        opreg_sdk::dispatch!(to, ALL, |D| {
            let y = ctx.output_slice::<D>(0, shape)?;
            ctx.parallel_chunks(y, GRAIN, |start, out| {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = match get(start + j) {
                        Wide::Int(v) => D::from_i128(v),
                        Wide::Float(v) => D::from_f64(v),
                    };
                }
            })
        }, other => Err(super::unsupported("Cast (target)", other)))
    }
}

#[cfg(test)]
mod tests {
    use super::Cast;
    use opreg_sdk::prelude::*;

    type Factory = fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>;

    /// f32 -> f16 a slice at a time rounds as the element path (through f64, `half`'s
    /// software rounding) over f32 bit patterns spread across the range (ties, subnormals,
    /// overflow to infinity, infinities, NaN), and f16 -> f32 is exact for all 65 536 values.
    #[test]
    fn half_conversions_by_slice_equal_the_element_path() {
        use opreg_sdk::half::f16;
        use opreg_sdk::testkit::{run_kernel, NodeSpec};
        let mut xs: Vec<f32> = (0..200_003u32)
            .map(|i| f32::from_bits(i.wrapping_mul(21_474)))
            .collect();
        xs.extend([
            65504.0,
            65520.0,
            65519.99,
            1e-8,
            -0.0,
            f32::INFINITY,
            f32::NAN,
        ]);
        let tx = opreg_sdk::host::HostTensor::from_vec(&[xs.len()], &xs).expect("x");
        let to_f16 = NodeSpec::onnx("Cast", 19).attr("to", AttrValue::Int(10));
        let got = run_kernel(Cast::from_node as Factory, &to_f16, &[&tx], None).expect("run");
        let got = got[0].to_vec::<f16>().expect("f16");
        for (g, &v) in got.iter().zip(&xs) {
            let want = f16::from_f64(v as f64);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "{v:e}: {g} vs {want}"
            );
        }
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let th = opreg_sdk::host::HostTensor::from_vec(&[all.len()], &all).expect("x");
        let to_f32 = NodeSpec::onnx("Cast", 19).attr("to", AttrValue::Int(1));
        let got = run_kernel(Cast::from_node as Factory, &to_f32, &[&th], None).expect("run");
        for (g, h) in got[0].to_vec::<f32>().expect("f32").iter().zip(&all) {
            let want = h.to_f64() as f32;
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "{h}"
            );
        }
    }

    /// f32 -> bf16 by slice rounds to nearest even as `half`'s `bf16::from_f32` (and numpy's
    /// `ml_dtypes`) over f32 bit patterns spread across the range (ties, subnormals, rounding
    /// up to infinity, NaN), and so does the element path of other sources (through f64);
    /// bf16 -> f32 is exact for all 65 536 values.
    #[test]
    fn bf16_conversions_by_slice_equal_the_element_path() {
        use opreg_sdk::half::bf16;
        use opreg_sdk::testkit::{run_kernel, NodeSpec};
        let mut xs: Vec<f32> = (0..200_003u32)
            .map(|i| f32::from_bits(i.wrapping_mul(21_474)))
            .collect();
        xs.extend([
            f32::MAX,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x0000_8001),
            -0.0,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
        ]);
        let tx = opreg_sdk::host::HostTensor::from_vec(&[xs.len()], &xs).expect("x");
        let to_bf16 = NodeSpec::onnx("Cast", 19).attr("to", AttrValue::Int(16));
        let got = run_kernel(Cast::from_node as Factory, &to_bf16, &[&tx], None).expect("run");
        let got = got[0].to_vec::<bf16>().expect("bf16");
        // The same values as f64 take the element path.
        let wide: Vec<f64> = xs.iter().map(|&v| f64::from(v)).collect();
        let tw = opreg_sdk::host::HostTensor::from_vec(&[wide.len()], &wide).expect("x");
        let from_f64 = run_kernel(Cast::from_node as Factory, &to_bf16, &[&tw], None).expect("run");
        let from_f64 = from_f64[0].to_vec::<bf16>().expect("bf16");
        for ((g, h), &v) in got.iter().zip(&from_f64).zip(&xs) {
            let want = bf16::from_f32(v);
            for g in [g, h] {
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{v:e}: {g} vs {want}"
                );
            }
        }
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let tb = opreg_sdk::host::HostTensor::from_vec(&[all.len()], &all).expect("x");
        let to_f32 = NodeSpec::onnx("Cast", 19).attr("to", AttrValue::Int(1));
        let got = run_kernel(Cast::from_node as Factory, &to_f32, &[&tb], None).expect("run");
        for (g, h) in got[0].to_vec::<f32>().expect("f32").iter().zip(&all) {
            let want = h.to_f64() as f32;
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "{h}"
            );
        }
    }

    /// The official `Cast` / `CastLike` cases: every type pair, the 8-, 4- and 2-bit types,
    /// `saturate` and `round_mode` included.
    #[test]
    fn onnx_cast_cases() {
        crate::testcases::run_cases(&["test_cast_"], Cast::from_node as Factory);
        crate::testcases::run_cases(&["test_castlike_"], Cast::like_from_node as Factory);
    }
}
