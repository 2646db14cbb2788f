//! Unary operators: activations, float math, sign/abs/neg, Clip, IsNaN/IsInf, Not,
//! BitwiseNot.

use super::engine::map;
use crate::util::input;
use opreg_sdk::numeric::{Arith, Bits, Bool, Real, Scalar};
use opreg_sdk::prelude::*;

/// Float-only unary operators (computed in f32 for f16/bf16), with their attributes.
#[derive(Clone, Copy, Debug)]
pub enum FloatOp {
    LeakyRelu(f32),
    Elu(f32),
    Selu { alpha: f32, gamma: f32 },
    Celu(f32),
    Sigmoid,
    HardSigmoid { alpha: f32, beta: f32 },
    HardSwish,
    Softplus,
    Softsign,
    Tanh,
    Gelu { tanh: bool },
    Mish,
    ThresholdedRelu(f32),
    Exp,
    Log,
    Sqrt,
    Reciprocal,
    Floor,
    Ceil,
    Round,
    Erf,
    Sin,
    Cos,
    Tan,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Asinh,
    Acosh,
    Atanh,
}

#[derive(Clone)]
pub struct FloatUnary(pub FloatOp);

impl Kernel for FloatUnary {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("float unary op", inputs, 0, "X")?;
        opreg_sdk::dispatch!(x.dtype, FLOATS, |T| float_unary::<T>(ctx, x, self.0), other => Err(super::unsupported("float unary op", other)))
    }
}

#[inline]
fn hard_sigmoid<C: Real>(v: C, alpha: C, beta: C) -> C {
    let t = alpha * v + beta;
    if t < C::ZERO {
        C::ZERO
    } else if t > C::ONE {
        C::ONE
    } else {
        t
    }
}

fn softplus<C: Real>(v: C) -> C {
    // ln(1 + e^v) without overflow.
    if v > C::ZERO {
        v + (-v).exp().ln_1p()
    } else {
        v.exp().ln_1p()
    }
}

fn float_unary<T: Scalar>(
    ctx: &KernelContext<'_>,
    x: &TensorView<'_>,
    op: FloatOp,
) -> Result<(), PluginError>
where
    T::Compute: Real,
{
    if T::DTYPE == DType::F32 {
        if let Some(fast) = Fast::of(op) {
            return fast.run(ctx, x);
        }
    }
    let c = |v: f64| <T::Compute as Scalar>::from_f64(v);
    let (zero, one, half) = (c(0.0), c(1.0), c(0.5));
    macro_rules! go {
        (|$v:ident| $e:expr) => {
            map(ctx, x, move |x: T| {
                let $v = x.load();
                T::store($e)
            })
        };
    }
    match op {
        FloatOp::LeakyRelu(a) => {
            let a = c(a.into());
            go!(|v| if v < zero { a * v } else { v })
        }
        FloatOp::Elu(a) => {
            let a = c(a.into());
            go!(|v| if v < zero { a * v.exp_m1() } else { v })
        }
        FloatOp::Selu { alpha, gamma } => {
            let (a, g) = (c(alpha.into()), c(gamma.into()));
            go!(|v| if v <= zero {
                g * (a * v.exp() - a)
            } else {
                g * v
            })
        }
        FloatOp::Celu(a) => {
            // max(0, x) + min(0, alpha * (exp(x / alpha) - 1)), for alpha > 0.
            let a = c(a.into());
            go!(|v| if v > zero { v } else { a * (v / a).exp_m1() })
        }
        FloatOp::Sigmoid => go!(|v| v.sigmoid()),
        FloatOp::HardSigmoid { alpha, beta } => {
            let (a, b) = (c(alpha.into()), c(beta.into()));
            go!(|v| hard_sigmoid(v, a, b))
        }
        FloatOp::HardSwish => {
            let a = c(1.0 / 6.0);
            go!(|v| v * hard_sigmoid(v, a, half))
        }
        FloatOp::Softplus => go!(|v| softplus(v)),
        FloatOp::Softsign => go!(|v| v / (one + Arith::abs(v))),
        FloatOp::Tanh => go!(|v| v.tanh()),
        FloatOp::Gelu { tanh: false } => {
            let r = c(std::f64::consts::FRAC_1_SQRT_2);
            go!(|v| half * v * (one + (v * r).erf()))
        }
        FloatOp::Gelu { tanh: true } => {
            let (k, b) = (c((2.0 / std::f64::consts::PI).sqrt()), c(0.044715));
            go!(|v| half * v * (one + (k * (v + b * v * v * v)).tanh()))
        }
        FloatOp::Mish => go!(|v| v * softplus(v).tanh()),
        FloatOp::ThresholdedRelu(a) => {
            let a = c(a.into());
            go!(|v| if v > a { v } else { zero })
        }
        FloatOp::Exp => go!(|v| v.exp()),
        FloatOp::Log => go!(|v| v.ln()),
        FloatOp::Sqrt => go!(|v| v.sqrt()),
        FloatOp::Reciprocal => go!(|v| one / v),
        FloatOp::Floor => go!(|v| v.floor()),
        FloatOp::Ceil => go!(|v| v.ceil()),
        FloatOp::Round => go!(|v| v.round_ties_even()),
        FloatOp::Erf => go!(|v| v.erf()),
        FloatOp::Sin => go!(|v| v.sin()),
        FloatOp::Cos => go!(|v| v.cos()),
        FloatOp::Tan => go!(|v| v.tan()),
        FloatOp::Asin => go!(|v| v.asin()),
        FloatOp::Acos => go!(|v| v.acos()),
        FloatOp::Atan => go!(|v| v.atan()),
        FloatOp::Sinh => go!(|v| v.sinh()),
        FloatOp::Cosh => go!(|v| v.cosh()),
        FloatOp::Asinh => go!(|v| v.asinh()),
        FloatOp::Acosh => go!(|v| v.acosh()),
        FloatOp::Atanh => go!(|v| v.atanh()),
    }
}

/// A loop over a slice in intrinsics of a target feature (unsafe: the CPU must have it).
#[cfg(target_arch = "x86_64")]
type SliceFn = unsafe fn(&[f32], &mut [f32]);

/// The f32 operators [`unary_f32`] runs: activations and the functions with a branch-free
/// polynomial in the SDK, each as [`float_unary`] (or [`num_unary`]) computes it.
#[derive(Clone, Copy)]
enum Fast {
    /// With AVX-512 in [`sigmoid_slice_avx512`](crate::simd::sigmoid_slice_avx512).
    Sigmoid,
    Erf,
    Gelu,
    /// [`exp32`](opreg_sdk::numeric::exp32) (within 2 ulp) where the generic path calls the
    /// C library's `expf` per element: 1.5 ns each, 17x ONNX Runtime's vectorized `Exp`
    /// (measured, 64 Ki values). With AVX-512 in [`exp32_avx512`](crate::simd::exp32_avx512)
    /// (fused multiply-adds, within an ulp of `exp32`): the loop below, partly scalar, ran at
    /// 2.6x ONNX Runtime.
    Exp,
    /// [`tanh32`](opreg_sdk::numeric::tanh32) (within 2 ulp), likewise; with AVX-512 in
    /// [`tanh_slice_avx512`](crate::simd::tanh_slice_avx512).
    Tanh,
    Relu,
    LeakyRelu(f32),
    HardSigmoid(f32, f32),
    HardSwish,
    /// One rounding instruction per vector with SSE4.1 and up, where the SSE2 baseline called
    /// the C library per element (5.8 ns each, 26x ONNX Runtime's `Floor`).
    Floor,
    Ceil,
    Round,
}

impl Fast {
    fn of(op: FloatOp) -> Option<Fast> {
        match op {
            FloatOp::Sigmoid => Some(Fast::Sigmoid),
            FloatOp::Erf => Some(Fast::Erf),
            FloatOp::Gelu { tanh: false } => Some(Fast::Gelu),
            FloatOp::Exp => Some(Fast::Exp),
            FloatOp::Tanh => Some(Fast::Tanh),
            FloatOp::LeakyRelu(a) => Some(Fast::LeakyRelu(a)),
            FloatOp::HardSigmoid { alpha, beta } => Some(Fast::HardSigmoid(alpha, beta)),
            FloatOp::HardSwish => Some(Fast::HardSwish),
            FloatOp::Floor => Some(Fast::Floor),
            FloatOp::Ceil => Some(Fast::Ceil),
            FloatOp::Round => Some(Fast::Round),
            _ => None,
        }
    }

    /// `y = op(x)` over f32 tensors into output 0, in parallel chunks.
    fn run(self, ctx: &KernelContext<'_>, x: &TensorView<'_>) -> Result<(), PluginError> {
        let xs = x.as_slice::<f32>()?;
        let y = ctx.output_slice_to_overwrite::<f32>(0, x.shape())?;
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx512() {
            let vector: Option<SliceFn> = match self {
                Fast::Exp => Some(crate::simd::exp32_slice_avx512),
                Fast::Sigmoid => Some(crate::simd::sigmoid_slice_avx512),
                Fast::Tanh => Some(crate::simd::tanh_slice_avx512),
                _ => None,
            };
            if let Some(f) = vector {
                return ctx.parallel_chunks(y, super::engine::GRAIN, |start, out| {
                    // SAFETY: the CPU has AVX-512 F (checked), all `f` needs.
                    unsafe { f(&xs[start..start + out.len()], out) }
                });
            }
        }
        ctx.parallel_chunks(y, super::engine::GRAIN, |start, out| {
            unary_f32(&xs[start..start + out.len()], out, self)
        })
    }
}

crate::simd::simd_fn! {
    /// `y = op(x)` in f32, with the operator chosen outside the loop and the loop compiled for
    /// AVX-512 and AVX2 too: the generic path's loop, built for the SSE2 baseline, stayed
    /// scalar (an Erf cost ~1 ns per element). Each arm computes what [`float_unary`] does.
    fn unary_f32(x: &[f32], y: &mut [f32], op: Fast) {
        macro_rules! each {
            (|$v:ident| $e:expr) => {
                for (o, &$v) in y.iter_mut().zip(x) {
                    *o = $e;
                }
            };
        }
        match op {
            Fast::Sigmoid => each!(|v| Real::sigmoid(v)),
            Fast::Erf => each!(|v| Real::erf(v)),
            Fast::Gelu => {
                let r = std::f64::consts::FRAC_1_SQRT_2 as f32;
                each!(|v| 0.5 * v * (1.0 + Real::erf(v * r)))
            }
            Fast::Exp => each!(|v| opreg_sdk::numeric::exp32(v)),
            Fast::Tanh => each!(|v| opreg_sdk::numeric::tanh32(v)),
            Fast::Relu => each!(|v| if v < 0.0 { 0.0 } else { v }),
            Fast::LeakyRelu(a) => each!(|v| if v < 0.0 { a * v } else { v }),
            Fast::HardSigmoid(a, b) => each!(|v| hard_sigmoid(v, a, b)),
            Fast::HardSwish => {
                let a = (1.0f64 / 6.0) as f32;
                each!(|v| v * hard_sigmoid(v, a, 0.5))
            }
            Fast::Floor => each!(|v| v.floor()),
            Fast::Ceil => each!(|v| v.ceil()),
            Fast::Round => each!(|v| v.round_ties_even()),
        }
    }
}

/// Unary operators defined for integers too.
#[derive(Clone, Copy, Debug)]
pub enum NumOp {
    Relu,
    Abs,
    Neg,
    Sign,
}

#[derive(Clone)]
pub struct NumUnary(pub NumOp);

impl Kernel for NumUnary {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("numeric unary op", inputs, 0, "X")?;
        opreg_sdk::dispatch!(x.dtype, NUMERIC, |T| num_unary::<T>(ctx, x, self.0), other => Err(super::unsupported("numeric unary op", other)))
    }
}

fn num_unary<T: Scalar>(
    ctx: &KernelContext<'_>,
    x: &TensorView<'_>,
    op: NumOp,
) -> Result<(), PluginError>
where
    T::Compute: Arith,
{
    if let (DType::F32, NumOp::Relu) = (T::DTYPE, op) {
        return Fast::Relu.run(ctx, x);
    }
    let zero = <T::Compute as Arith>::ZERO;
    // `move`: a bound captured by reference is read back through the reference after every
    // store (the output might alias it), which kept these loops scalar.
    match op {
        NumOp::Relu => map(ctx, x, move |x: T| {
            let v = x.load();
            T::store(if v < zero { zero } else { v })
        }),
        NumOp::Abs => map(ctx, x, |x: T| T::store(x.load().abs())),
        NumOp::Neg => map(ctx, x, |x: T| T::store(x.load().neg())),
        NumOp::Sign => map(ctx, x, |x: T| T::store(x.load().sign())),
    }
}

/// `Clip`: bounds from attributes (opset 6) or from optional scalar inputs 1 and 2 (11+).
/// An absent bound is the type's lowest / highest value.
#[derive(Clone)]
pub struct Clip {
    /// Opset 6 attributes; `None` for the input form.
    pub attrs: Option<(Option<f32>, Option<f32>)>,
}

impl Kernel for Clip {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("Clip", inputs, 0, "input")?;
        opreg_sdk::dispatch!(x.dtype, NUMERIC, |T| self.clip::<T>(ctx, inputs), other => Err(super::unsupported("Clip", other)))
    }
}

impl Clip {
    fn clip<T: Scalar>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let bound =
            |i: usize, name: &str, attr: Option<f32>, default: T| -> Result<T, PluginError> {
                if self.attrs.is_some() {
                    return Ok(attr.map_or(default, |v| T::from_f64(v.into())));
                }
                match inputs.get(i) {
                    Some(v) if !v.is_absent() => match v.as_slice::<T>()? {
                        [b] => Ok(*b),
                        other => Err(PluginError::invalid(format!(
                            "Clip: input '{name}' must be a scalar, got {} elements",
                            other.len()
                        ))),
                    },
                    _ => Ok(default),
                }
            };
        let (amin, amax) = self.attrs.unwrap_or((None, None));
        let lo = bound(1, "min", amin, T::LOWEST)?.load();
        let hi = bound(2, "max", amax, T::MAX)?.load();
        // min > max clips everything to max, as the spec says; NaN passes through.
        map(ctx, &input("Clip", inputs, 0, "input")?, move |x: T| {
            let v = x.load();
            let v = if v < lo { lo } else { v };
            T::store(if v > hi { hi } else { v })
        })
    }
}

/// `IsNaN` and `IsInf`.
#[derive(Clone)]
pub enum FloatTest {
    IsNaN,
    IsInf { positive: bool, negative: bool },
}

impl Kernel for FloatTest {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("IsNaN/IsInf", inputs, 0, "X")?;
        opreg_sdk::dispatch!(x.dtype, FLOATS, |T| self.test::<T>(ctx, x), other => Err(super::unsupported("IsNaN/IsInf", other)))
    }
}

impl FloatTest {
    fn test<T: Scalar>(
        &self,
        ctx: &KernelContext<'_>,
        x: &TensorView<'_>,
    ) -> Result<(), PluginError>
    where
        T::Compute: Real,
    {
        match *self {
            FloatTest::IsNaN => map(ctx, x, |x: T| Bool::new(x.load().is_nan())),
            FloatTest::IsInf { positive, negative } => map(ctx, x, |x: T| {
                let v = x.load();
                Bool::new(
                    v.is_infinite()
                        && if v.is_sign_positive() {
                            positive
                        } else {
                            negative
                        },
                )
            }),
        }
    }
}

/// `Not` (bool) and `BitwiseNot` (integers).
#[derive(Clone)]
pub struct Not;

impl Kernel for Not {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("Not/BitwiseNot", inputs, 0, "X")?;
        if x.dtype == DType::Bool {
            return map(ctx, x, |v: Bool| Bool::new(!v.get()));
        }
        opreg_sdk::dispatch!(x.dtype, INTEGERS, |T| map(ctx, x, |v: T| v.not()), other => Err(super::unsupported("BitwiseNot", other)))
    }
}
