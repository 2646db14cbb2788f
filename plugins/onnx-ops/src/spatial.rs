//! Spatial operators: resampling (Resize, Upsample, GridSample, AffineGrid), cropping and
//! folding (CenterCropPad, Col2Im), and detection helpers (RoiAlign, NonMaxSuppression).
//!
//! Semantics follow the ONNX specification and its reference implementation
//! (`onnx/reference/ops`); interpolation arithmetic is carried out in `f64`, as the reference
//! does, and rounded to the element type once per output element.

use opreg_sdk::prelude::*;

mod crop;
mod grid;
mod resize;
mod roi;

/// The float types the interpolating kernels accept, and the element conversions through
/// `f64` they use (the SDK's: floats round to nearest, integers truncate with saturation, as
/// numpy's `astype` does for in-range values).
pub(crate) use opreg_sdk::numeric::{Scalar, FLOATS};

/// The error for an element type a spatial kernel does not take (the fallback arm of its
/// `opreg_sdk::dispatch!`).
pub(crate) fn unsupported(what: &str, dtype: DType) -> PluginError {
    PluginError::invalid(format!("{what}: element type {dtype} is not supported"))
}

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
