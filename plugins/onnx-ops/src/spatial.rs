//! Spatial operators: resampling (Resize, Upsample, GridSample, AffineGrid), cropping and
//! folding (CenterCropPad, Col2Im), and detection helpers (RoiAlign, NonMaxSuppression).
//!
//! Semantics follow the ONNX specification and its reference implementation
//! (`onnx/reference/ops`); interpolation arithmetic is carried out in `f64`, as the reference
//! does, and rounded to the element type once per output element.

use opreg_sdk::{
    half::{bf16, f16},
    prelude::*,
};

mod crop;
mod grid;
#[cfg(test)]
pub(crate) mod onnx_cases;
mod resize;
mod roi;

/// Float element types the interpolating kernels accept.
pub(crate) const FLOATS: &[DType] = &[DType::F16, DType::BF16, DType::F32, DType::F64];

/// An element that interpolation reads and writes through `f64`.
pub(crate) trait Scalar: Element {
    fn to_f64(self) -> f64;
    /// Rounds (floats) or truncates toward zero with saturation (integers), as numpy's
    /// `astype` does for in-range values.
    fn from_f64(v: f64) -> Self;
}

macro_rules! scalar_prim {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self { v as $t }
        }
    )*};
}
scalar_prim!(f32, f64, u8, i8, i32, i64);

impl Scalar for f16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl Scalar for bf16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

/// Runs `$body` with `$t` bound to the Rust type of a float `$dtype`; other types are an
/// error naming `$what`.
macro_rules! with_float {
    ($dtype:expr, $what:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::F16 => {
                type $t = opreg_sdk::half::f16;
                $body
            }
            DType::BF16 => {
                type $t = opreg_sdk::half::bf16;
                $body
            }
            other => Err(PluginError::invalid(format!(
                "{}: element type {other} is not supported",
                $what
            ))),
        }
    };
}
pub(crate) use with_float;

/// The elements of a float tensor (f16, bf16, f32 or f64) widened to `f64`.
pub(crate) fn read_f64s(view: &TensorView<'_>, what: &str) -> Result<Vec<f64>, PluginError> {
    with_float!(view.dtype, what, T => Ok(view
        .as_slice::<T>()?
        .iter()
        .map(|&v| Scalar::to_f64(v))
        .collect()))
}

/// Input `i` unless it is absent or missing.
pub(crate) fn optional<'a, 'b>(
    inputs: &'b [TensorView<'a>],
    i: usize,
) -> Option<&'b TensorView<'a>> {
    inputs.get(i).filter(|t| !t.is_absent())
}

/// Input `i`, which the operator requires.
pub(crate) fn required<'a, 'b>(
    inputs: &'b [TensorView<'a>],
    i: usize,
    op: &str,
    name: &str,
) -> Result<&'b TensorView<'a>, PluginError> {
    optional(inputs, i)
        .ok_or_else(|| PluginError::invalid(format!("{op}: input '{name}' is required")))
}

/// Row-major strides, in elements.
pub(crate) fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

pub fn register(r: &mut Registrar) {
    resize::register(r);
    grid::register(r);
    crop::register(r);
    roi::register(r);
}
