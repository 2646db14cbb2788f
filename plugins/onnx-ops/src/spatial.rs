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
        crate::util::match_float!($dtype, |$t| $body, other => Err(PluginError::invalid(
            format!("{}: element type {other} is not supported", $what)
        )))
    };
}
pub(crate) use with_float;

/// The elements of a float tensor (f16, bf16, f32 or f64) widened to `f64`.
pub(crate) fn read_f64s(view: &TensorView<'_>, what: &str) -> Result<Vec<f64>, PluginError> {
    crate::util::floats_as_f64(view).unwrap_or_else(|| {
        Err(PluginError::invalid(format!(
            "{what}: element type {} is not supported",
            view.dtype
        )))
    })
}

pub(crate) use crate::util::optional;

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

pub(crate) use crate::util::row_major_strides;

pub fn register(r: &mut Registrar) {
    resize::register(r);
    grid::register(r);
    crop::register(r);
    roi::register(r);
}
